//! The io_uring layer shared by the read engine's workers and the trace
//! reader: one bounded submit-and-wait, one drain, one failure model, and
//! one rule for memory the kernel may still write.
//!
//! # The buffer rule
//!
//! A read's buffer belongs to the kernel from the moment its SQE is
//! submitted until its CQE is reaped. In `io_uring/rw.c`, `io_read` hands
//! the buffer (the SQE's address, or the registered buffer's pages for
//! `READ_FIXED`) to the file's `read_iter`; a block device under `O_DIRECT`
//! returns `-EIOCBQUEUED` and the device writes the pages whenever it
//! completes, after which `io_complete_rw` -> `io_req_rw_complete` posts the
//! CQE. Reads punted to io-wq run `io_read` later still. So until the CQE is
//! seen the memory may be written at any time, also after `io_uring_enter`
//! returned an error, and also after the ring's descriptor is closed (the
//! request holds its own references to the pages, not to our allocation).
//!
//! The one mechanism: memory given to a ring lives in a [`KernelBuffers`],
//! declared after the ring so that it drops after it. Whoever submits counts
//! what is in flight; when it cannot reap everything ([`drain`] gives up:
//! enter keeps failing, or the device does not answer within its bound) it
//! calls [`KernelBuffers::abandon`], and the buffers are leaked instead of
//! freed. Nothing else ever frees memory a ring was given.
//!
//! # The bounded wait
//!
//! [`Waiter::enter`] submits and waits in slices of at most
//! [`WAIT_SLICE`] (`IORING_ENTER_EXT_ARG` with a timeout, Linux 5.11), so a
//! caller blocked on a slow device still looks at its stop flag. EINTR,
//! EAGAIN and EBUSY (a signal, or the kernel pushing back) are retried after
//! a short pause, at most [`REFUSALS_MAX`] times in a row without progress;
//! any other errno fails the ring ([`EnterError`]). [`drain`] waits for
//! everything in flight for at most [`DRAIN_WAIT_MAX`].

use io_uring::{IoUring, types};
use std::io;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

/// Longest a single `io_uring_enter` blocks before it returns to its caller.
pub const WAIT_SLICE: Duration = Duration::from_millis(100);
/// Enters in a row that were interrupted or pushed back with nothing
/// reaped in between, before the ring counts as failed. With
/// [`REFUSAL_PAUSE`] between them, about a second of refusals.
pub const REFUSALS_MAX: u32 = 10_000;
/// Pause after a refused enter: the kernel is short of memory for requests
/// or wants its completions reaped first.
pub const REFUSAL_PAUSE: Duration = Duration::from_micros(100);
/// Longest [`drain`] waits for the reads in flight after a failure or a
/// stop: a device that answers none of them in this long is not coming
/// back soon, and leaking the buffers beats hanging.
pub const DRAIN_WAIT_MAX: Duration = Duration::from_secs(30);

/// The kernel-facing part: `io_uring_enter` and the completion queue.
/// [`IoUring`] in the product; a fake in tests.
pub trait Kernel {
    /// Submits every queued SQE and waits for `want` completions, for at
    /// most `timeout` (`None`: no limit). Returns the SQEs submitted, or the
    /// errno (`ETIME` when the timeout passed first).
    fn enter(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<usize>;

    /// Moves available CQEs, as (user_data, result), into `out`; at most
    /// `out.len()`. Returns how many.
    fn reap(&mut self, out: &mut [(u64, i32)]) -> usize;
}

impl Kernel for IoUring {
    fn enter(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<usize> {
        match timeout {
            Some(timeout) if self.params().is_feature_ext_arg() => {
                let timespec = types::Timespec::from(timeout);
                let args = types::SubmitArgs::new().timespec(&timespec);
                self.submitter().submit_with_args(want, &args)
            }
            // Before 5.11: an unbounded wait, as before this layer existed.
            _ => self.submit_and_wait(want),
        }
    }

    fn reap(&mut self, out: &mut [(u64, i32)]) -> usize {
        let mut completion_queue = self.completion();
        completion_queue.sync();
        let mut count = 0;
        while count < out.len() {
            let Some(cqe) = completion_queue.next() else {
                break;
            };
            out[count] = (cqe.user_data(), cqe.result());
            count += 1;
        }
        count
    }
}

/// `io_uring_enter` failed in a way that is not back-pressure: the ring
/// must not be used again (SQEs it never took may be left in it).
#[derive(Debug, thiserror::Error)]
#[error("io_uring_enter {reason}: {source}")]
pub struct EnterError {
    /// "failed", or why a retryable errno was given up on.
    pub reason: &'static str,
    #[source]
    pub source: io::Error,
}

/// What one [`Waiter::enter`] did, when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entered {
    /// Submitted, and waited until `want` completions were there.
    Ready,
    /// Returned early (the slice passed, a signal, or a refusal paused
    /// for): look around, reap what is there, enter again.
    Early,
}

/// The bounded submit-and-wait: counts refusals in a row.
#[derive(Debug)]
pub struct Waiter {
    refusal_count: u32,
    refusals_max: u32,
    pause: Duration,
    slice: Option<Duration>,
}

impl Default for Waiter {
    fn default() -> Waiter {
        Waiter::new(REFUSALS_MAX, REFUSAL_PAUSE, Some(WAIT_SLICE))
    }
}

impl Waiter {
    /// A waiter with its own bounds (tests use small ones).
    pub fn new(refusals_max: u32, pause: Duration, slice: Option<Duration>) -> Waiter {
        Waiter {
            refusal_count: 0,
            refusals_max,
            pause,
            slice,
        }
    }

    /// Submits what is queued and waits for `want` completions, for at most
    /// one slice. Call [`Waiter::progressed`] whenever completions are
    /// reaped, so that only refusals in a row count.
    pub fn enter(&mut self, kernel: &mut impl Kernel, want: usize) -> Result<Entered, EnterError> {
        match kernel.enter(want, self.slice) {
            Ok(_) => {
                self.refusal_count = 0;
                Ok(Entered::Ready)
            }
            Err(err) => match err.raw_os_error() {
                // The slice passed: a slow device is not a refusal.
                Some(libc::ETIME) => Ok(Entered::Early),
                Some(libc::EINTR | libc::EAGAIN | libc::EBUSY) => {
                    self.refusal_count += 1;
                    if self.refusal_count > self.refusals_max {
                        return Err(EnterError {
                            reason: "kept refusing or being interrupted",
                            source: err,
                        });
                    }
                    if err.raw_os_error() != Some(libc::EINTR) {
                        std::thread::sleep(self.pause);
                    }
                    Ok(Entered::Early)
                }
                _ => Err(EnterError {
                    reason: "failed",
                    source: err,
                }),
            },
        }
    }

    /// Completions were reaped: the refusals so far were not in a row.
    pub fn progressed(&mut self) {
        self.refusal_count = 0;
    }
}

/// [`drain`] could not wait for every completion: the memory the ring was
/// given must be [abandoned](KernelBuffers::abandon).
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error(transparent)]
    Enter(#[from] EnterError),
    #[error("{in_flight_count} reads did not complete within {waited:?}")]
    TimedOut {
        in_flight_count: usize,
        waited: Duration,
    },
}

/// Waits until the kernel has completed the `in_flight_count` requests it
/// holds, handing each completion to `handle` (after collecting a batch into
/// `completions`, never inside the scan), for at most `wait_max`.
pub fn drain(
    kernel: &mut impl Kernel,
    waiter: &mut Waiter,
    mut in_flight_count: usize,
    completions: &mut [(u64, i32)],
    wait_max: Duration,
    handle: &mut dyn FnMut(u64, i32),
) -> Result<(), DrainError> {
    let started = Instant::now();
    // Bounded by `wait_max` and by the waiter's refusals.
    while in_flight_count > 0 {
        let waited = started.elapsed();
        if waited >= wait_max {
            return Err(DrainError::TimedOut {
                in_flight_count,
                waited,
            });
        }
        waiter.enter(kernel, in_flight_count)?;
        let reaped_count = kernel.reap(completions);
        assert!(
            reaped_count <= in_flight_count,
            "more completions than requests in flight"
        );
        if reaped_count > 0 {
            waiter.progressed();
        }
        in_flight_count -= reaped_count;
        for &(user_data, result) in &completions[..reaped_count] {
            handle(user_data, result);
        }
    }
    Ok(())
}

/// Memory a ring may write: dropped normally unless [abandoned](Self::abandon),
/// then leaked (module documentation). Declare it after the ring that
/// writes it, so that the ring (and its registration) drops first.
pub struct KernelBuffers<T> {
    inner: ManuallyDrop<T>,
    abandoned: bool,
}

impl<T> KernelBuffers<T> {
    pub fn new(inner: T) -> KernelBuffers<T> {
        KernelBuffers {
            inner: ManuallyDrop::new(inner),
            abandoned: false,
        }
    }

    /// A request that writes into this memory may still be in flight:
    /// never free it.
    pub fn abandon(&mut self) {
        self.abandoned = true;
    }

    pub fn is_abandoned(&self) -> bool {
        self.abandoned
    }
}

impl<T> Deref for KernelBuffers<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T> DerefMut for KernelBuffers<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<T> Drop for KernelBuffers<T> {
    fn drop(&mut self) {
        if self.abandoned {
            // The kernel may still write here: leaking is the only safe end.
            return;
        }
        // SAFETY: dropped once, here; not abandoned, so every request given
        // this memory has been reaped and nothing refers to it any more.
        unsafe { ManuallyDrop::drop(&mut self.inner) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::collections::VecDeque;
    use std::rc::Rc;

    /// A scripted kernel: each enter pops the next outcome; each Ok makes
    /// the given number of completions available.
    struct Fake {
        script: VecDeque<Result<usize, i32>>,
        ready: VecDeque<(u64, i32)>,
        next_user_data: u64,
        enters: usize,
        timeouts_seen: Vec<Option<Duration>>,
    }

    impl Fake {
        fn new(script: impl IntoIterator<Item = Result<usize, i32>>) -> Fake {
            Fake {
                script: script.into_iter().collect(),
                ready: VecDeque::new(),
                next_user_data: 0,
                enters: 0,
                timeouts_seen: Vec::new(),
            }
        }
    }

    impl Kernel for Fake {
        fn enter(&mut self, _want: usize, timeout: Option<Duration>) -> io::Result<usize> {
            self.enters += 1;
            self.timeouts_seen.push(timeout);
            match self.script.pop_front().unwrap_or(Err(libc::ETIME)) {
                Ok(completed) => {
                    for _ in 0..completed {
                        self.ready.push_back((self.next_user_data, 4096));
                        self.next_user_data += 1;
                    }
                    Ok(0)
                }
                Err(errno) => Err(io::Error::from_raw_os_error(errno)),
            }
        }

        fn reap(&mut self, out: &mut [(u64, i32)]) -> usize {
            let mut count = 0;
            while count < out.len()
                && let Some(cqe) = self.ready.pop_front()
            {
                out[count] = cqe;
                count += 1;
            }
            count
        }
    }

    fn quick_waiter(refusals_max: u32) -> Waiter {
        Waiter::new(refusals_max, Duration::ZERO, Some(Duration::from_millis(1)))
    }

    #[test]
    fn every_wait_is_bounded_by_the_slice() {
        let mut fake = Fake::new([Ok(1)]);
        let mut waiter = Waiter::default();
        assert_eq!(waiter.enter(&mut fake, 1).unwrap(), Entered::Ready);
        assert_eq!(fake.timeouts_seen, [Some(WAIT_SLICE)]);
        // The slice passing is not a failure, however often.
        let mut fake = Fake::new([]);
        let mut waiter = quick_waiter(3);
        for _ in 0..10 {
            assert_eq!(waiter.enter(&mut fake, 1).unwrap(), Entered::Early);
        }
    }

    #[test]
    fn refusals_in_a_row_are_bounded_and_progress_resets_them() {
        let mut fake = Fake::new([Err(libc::EINTR), Err(libc::EAGAIN), Err(libc::EBUSY)]);
        let mut waiter = quick_waiter(2);
        assert_eq!(waiter.enter(&mut fake, 1).unwrap(), Entered::Early);
        assert_eq!(waiter.enter(&mut fake, 1).unwrap(), Entered::Early);
        let err = waiter.enter(&mut fake, 1).unwrap_err();
        assert_eq!(err.source.raw_os_error(), Some(libc::EBUSY));

        let mut fake = Fake::new([
            Err(libc::EINTR),
            Err(libc::EINTR),
            Err(libc::EINTR),
            Err(libc::EINTR),
        ]);
        let mut waiter = quick_waiter(2);
        for _ in 0..2 {
            waiter.enter(&mut fake, 1).unwrap();
        }
        waiter.progressed();
        for _ in 0..2 {
            waiter.enter(&mut fake, 1).unwrap();
        }
    }

    #[test]
    fn other_errnos_fail_at_once() {
        let mut fake = Fake::new([Err(libc::EBADF)]);
        let err = quick_waiter(100).enter(&mut fake, 1).unwrap_err();
        assert_eq!(err.reason, "failed");
        assert_eq!(fake.enters, 1);
    }

    #[test]
    fn drain_hands_over_every_completion_then_stops() {
        let mut fake = Fake::new([Ok(2), Err(libc::EINTR), Err(libc::ETIME), Ok(1)]);
        let mut seen = Vec::new();
        let mut completions = [(0, 0); 4];
        drain(
            &mut fake,
            &mut quick_waiter(10),
            3,
            &mut completions,
            Duration::from_secs(10),
            &mut |user_data, result| seen.push((user_data, result)),
        )
        .unwrap();
        assert_eq!(seen, [(0, 4096), (1, 4096), (2, 4096)]);
        assert_eq!(fake.enters, 4, "no enter after the last completion");
    }

    #[test]
    fn drain_of_a_device_that_never_answers_gives_up_in_time() {
        let mut fake = Fake::new([Ok(1)]);
        let started = Instant::now();
        let err = drain(
            &mut fake,
            &mut quick_waiter(10),
            2,
            &mut [(0, 0); 2],
            Duration::from_millis(30),
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                DrainError::TimedOut {
                    in_flight_count: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        let err = drain(
            &mut Fake::new([Err(libc::ENXIO)]),
            &mut quick_waiter(10),
            1,
            &mut [(0, 0); 1],
            Duration::from_secs(10),
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(matches!(err, DrainError::Enter(_)), "{err}");
    }

    /// Counts its drops.
    struct Tracked(Rc<Cell<u32>>);

    impl Drop for Tracked {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }

    #[test]
    fn buffers_are_freed_unless_abandoned() {
        let drops = Rc::new(Cell::new(0));
        drop(KernelBuffers::new(Tracked(drops.clone())));
        assert_eq!(drops.get(), 1);
        let mut abandoned = KernelBuffers::new(Tracked(drops.clone()));
        abandoned.abandon();
        assert!(abandoned.is_abandoned());
        drop(abandoned);
        assert_eq!(drops.get(), 1, "abandoned memory is never freed");
    }

    #[test]
    fn a_real_ring_waits_one_slice_when_nothing_is_in_flight() {
        let Ok(mut ring) = IoUring::new(2) else {
            eprintln!("skipped: io_uring_setup failed here");
            return;
        };
        if !ring.params().is_feature_ext_arg() {
            eprintln!("skipped: no IORING_FEAT_EXT_ARG (Linux < 5.11)");
            return;
        }
        let mut waiter = Waiter::new(10, Duration::ZERO, Some(Duration::from_millis(20)));
        let started = Instant::now();
        assert_eq!(waiter.enter(&mut ring, 1).unwrap(), Entered::Early);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(15) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
    }
}
