//! The source device: facts from sysfs and ioctls (being written).
