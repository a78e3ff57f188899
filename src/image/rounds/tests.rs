//! The rounds driven against a simulated device and trace: scripted event
//! orders, and random ones checked against what the device held at the
//! final look.

use super::*;
use crate::image::pending::{COMPLETION_WAIT_NONE_SEEN, PendingWrites};
use proptest::prelude::*;
use std::collections::BTreeSet;

/// Simulated time per step of the world.
const TICK: Duration = Duration::from_millis(10);
const BLOCK_SECTORS: u64 = 8;
const BLOCK_BYTES: u64 = BLOCK_SECTORS * SECTOR_BYTES;

/// One write, by the simulated clock (ticks).
#[derive(Clone, Copy, Debug)]
struct Write {
    block: u64,
    value: u32,
    /// When its queue event is emitted; `None`: before tracing started.
    queue_at: Option<u32>,
    /// When its data is on the device (reads from then on see it).
    land_at: u32,
    /// When its completion event is emitted; `None`: never in range (brd).
    complete_at: Option<u32>,
    /// Counted by `/sys/block/DISK/inflight` while in flight (a driver has
    /// started it); false while in a plug, the scheduler or throttled.
    counted: bool,
}

impl Write {
    fn at(block: u64, value: u32, queue: u32, land: u32, complete: u32) -> Write {
        Write {
            block,
            value,
            queue_at: Some(queue),
            land_at: land,
            complete_at: Some(complete),
            counted: true,
        }
    }
}

/// Trace times: a queue event and a completion in the same tick are in that
/// order.
fn queue_ns(tick: u32) -> u64 {
    u64::from(tick) * 10
}

fn complete_ns(tick: u32) -> u64 {
    u64::from(tick) * 10 + 5
}

struct Sim {
    tick: u32,
    base: Instant,
    device: Vec<u32>,
    image: Vec<u32>,
    writes: Vec<Write>,
    landed: Vec<bool>,
    queue_drained: Vec<bool>,
    complete_drained: Vec<bool>,
    dirty: BTreeSet<u64>,
    pending: PendingWrites,
    frozen: bool,
    held_until: u32,
    /// The device at the latest look.
    at_last_look: Vec<u32>,
    /// When the settle before the main pass saw no write in flight.
    settled_at: u32,
    /// Blocks one look takes at most, and where the pass's next take
    /// starts (`None`: a new pass).
    batch: usize,
    cursor: Option<u64>,
}

impl Sim {
    fn new(blocks: usize, writes: Vec<Write>) -> Sim {
        for w in &writes {
            assert!(w.queue_at.is_none_or(|q| q <= w.land_at));
            assert!(w.complete_at.is_none_or(|c| c >= w.land_at));
        }
        let n = writes.len();
        let mut sim = Sim {
            tick: 0,
            base: Instant::now(),
            device: vec![0; blocks],
            image: vec![u32::MAX; blocks],
            writes,
            landed: vec![false; n],
            queue_drained: vec![false; n],
            complete_drained: vec![false; n],
            dirty: BTreeSet::new(),
            pending: PendingWrites::default(),
            frozen: false,
            held_until: 0,
            at_last_look: Vec::new(),
            settled_at: 0,
            batch: usize::MAX,
            cursor: None,
        };
        sim.land();
        // Before the main pass the run waits for `inflight` to read zero,
        // the trace drained meanwhile.
        while sim.inflight() > 0 {
            sim.advance();
            sim.drain();
        }
        sim.pending.restart();
        sim.settled_at = sim.tick;
        // The main pass: one block a tick, the trace drained as it goes.
        for block in 0..blocks {
            sim.advance();
            sim.image[block] = sim.device[block];
            sim.drain();
        }
        sim
    }

    fn now(&self) -> Instant {
        self.base + TICK * self.tick
    }

    fn advance(&mut self) {
        self.tick += 1;
        self.land();
    }

    fn land(&mut self) {
        for (i, w) in self.writes.iter().enumerate() {
            if !self.landed[i] && w.land_at <= self.tick {
                self.landed[i] = true;
                self.device[w.block as usize] = w.value;
            }
        }
    }

    /// Every event emitted so far: marks, and the pending writes. The
    /// completions first: a drain reads one CPU's buffer after another, so
    /// a completion can be read before an earlier queue event.
    fn drain(&mut self) {
        let now = self.now();
        self.drain_completions();
        for (i, w) in self.writes.iter().enumerate() {
            if !self.queue_drained[i] && w.queue_at.is_some_and(|q| q <= self.tick) {
                self.queue_drained[i] = true;
                self.dirty.insert(w.block);
                self.pending.queued(
                    w.block * BLOCK_SECTORS,
                    BLOCK_SECTORS,
                    queue_ns(w.queue_at.expect("drained")),
                    now,
                );
            }
        }
    }

    fn drain_completions(&mut self) {
        let now = self.now();
        for (i, w) in self.writes.iter().enumerate() {
            if !self.complete_drained[i] && w.complete_at.is_some_and(|c| c <= self.tick) {
                self.complete_drained[i] = true;
                self.dirty.insert(w.block);
                self.pending.completed(
                    w.block * BLOCK_SECTORS,
                    BLOCK_SECTORS,
                    complete_ns(w.complete_at.expect("drained")),
                    now,
                );
            }
        }
    }

    /// A write queued before the settle ended, not counted by `inflight`
    /// then, and completing after it: the case no event can reveal.
    fn has_unrevealable_write(&self) -> bool {
        self.writes.iter().any(|w| {
            w.queue_at.is_none_or(|q| q <= self.settled_at)
                && !w.counted
                && w.complete_at.is_none_or(|c| c > self.settled_at)
        })
    }

    /// A bounded take from the cursor on, as `DirtyMap::take_bounded`.
    fn take_batch(&mut self) -> Vec<u64> {
        let from = self.cursor.unwrap_or(0);
        let taken: Vec<u64> = self.dirty.range(from..).take(self.batch).copied().collect();
        for block in &taken {
            self.dirty.remove(block);
        }
        let more = taken.len() == self.batch && self.dirty.range(from..).next().is_some();
        self.cursor = more.then(|| taken.last().expect("a full batch") + 1);
        taken
    }

    fn inflight(&self) -> u64 {
        self.writes
            .iter()
            .filter(|w| {
                let started = w.queue_at.is_none_or(|q| q <= self.tick);
                let done = w.complete_at.unwrap_or(w.land_at);
                w.counted && started && self.tick < done
            })
            .count() as u64
    }
}

impl World for Sim {
    fn check(&mut self) -> anyhow::Result<()> {
        Ok(())
    }

    fn look(&mut self, extents: &mut Vec<Extent>) -> anyhow::Result<Look> {
        self.advance();
        self.drain();
        let mut pass_whole = self.cursor.is_none();
        let mut taken = self.take_batch();
        if taken.is_empty() && !pass_whole {
            pass_whole = true;
            taken = self.take_batch();
        }
        let dirty_bytes = taken.len() as u64 * BLOCK_BYTES;
        extents.extend(taken.iter().map(|&block| Extent {
            offset_bytes: block * BLOCK_BYTES,
            len_bytes: BLOCK_BYTES,
        }));
        self.at_last_look = self.device.clone();
        let now = self.now();
        Ok(Look {
            dirty_bytes,
            extent_count: extents.len(),
            pass_complete: self.cursor.is_none(),
            pass_whole: pass_whole && self.cursor.is_none(),
            pending: self.pending.summary(),
            completions: self.pending.completions(now),
            writes_in_flight: self.inflight(),
            held: self.tick < self.held_until,
            hold_frozen: false,
            frozen: self.frozen,
            now,
        })
    }

    fn put_back(&mut self, extents: &[Extent]) {
        self.dirty
            .extend(extents.iter().map(|e| e.offset_bytes / BLOCK_BYTES));
    }

    fn read(&mut self, extents: &[Extent]) -> anyhow::Result<RoundRead> {
        for extent in extents {
            // One block a tick; the pump drains between reads.
            self.advance();
            let block = (extent.offset_bytes / BLOCK_BYTES) as usize;
            self.image[block] = self.device[block];
            self.drain();
        }
        Ok(RoundRead {
            bytes_read: extents.len() as u64 * BLOCK_BYTES,
            seconds: 0.0,
        })
    }

    fn freeze(&mut self) -> anyhow::Result<String> {
        // FIFREEZE returns once the filesystem's writes are on the device.
        self.frozen = true;
        let tick = self.tick;
        for w in &mut self.writes {
            if w.queue_at.is_none_or(|q| q <= tick) && w.land_at > tick {
                w.land_at = tick;
                w.complete_at = w.complete_at.map(|_| tick);
            }
        }
        self.land();
        Ok("the simulated filesystem".into())
    }

    fn thaw(&mut self) -> anyhow::Result<()> {
        self.frozen = false;
        Ok(())
    }

    fn dirty_bytes(&mut self) -> u64 {
        self.dirty.len() as u64 * BLOCK_BYTES
    }

    fn mark_unconverged(&mut self, _changed_bytes: u64) -> anyhow::Result<()> {
        Ok(())
    }

    fn sleep(&mut self, _duration: Duration) {
        self.advance();
    }
}

fn config(freeze: bool) -> RoundsConfig {
    RoundsConfig {
        rounds_max: 32,
        freeze,
        freeze_dirty_bytes_max: 0,
        settle_wait_max: Duration::from_secs(1),
        hold_file: None,
    }
}

fn run(sim: &mut Sim, freeze: bool) -> Ending {
    let mut rounds = Rounds::new(config(freeze));
    let mut stats = Vec::new();
    let bytes = sim.device.len() as u64 * BLOCK_BYTES;
    catch_up(sim, &mut rounds, &mut stats, bytes).unwrap()
}

/// A converged run's image is the device as of its final look.
fn assert_exact(sim: &Sim) {
    assert_eq!(
        sim.image, sim.at_last_look,
        "image differs from the device at the final look (tick {})",
        sim.tick
    );
}

#[test]
fn a_write_queued_after_the_take_and_landing_after_the_read_is_read_again() {
    // 4 blocks: the main pass ends at tick 4. A write to block 2 lands at
    // 5 and is drained by the first look (tick 5), which takes block 2. A
    // second write to block 2 is queued at tick 6, right after that look
    // took the block, and lands at 8, after the round's read (tick 6).
    let mut sim = Sim::new(4, vec![Write::at(2, 7, 5, 5, 5), Write::at(2, 9, 6, 8, 9)]);
    assert_eq!(run(&mut sim, false), Ending::Converged);
    assert_eq!(sim.image[2], 9);
    assert_exact(&sim);
}

#[test]
fn a_write_not_counted_in_flight_keeps_the_run_from_ending() {
    // Queued at tick 5, in the scheduler (inflight reads 0 throughout),
    // lands and completes at tick 40.
    let write = Write {
        counted: false,
        ..Write::at(1, 5, 5, 40, 40)
    };
    let mut sim = Sim::new(4, vec![write]);
    assert_eq!(run(&mut sim, false), Ending::Converged);
    assert!(
        sim.tick >= 40,
        "ended at tick {} before the write landed",
        sim.tick
    );
    assert_eq!(sim.image[1], 5);
    assert_exact(&sim);
}

#[test]
fn a_completion_without_a_queue_event_is_read_again() {
    // Queued before tracing started and held where `inflight` does not
    // count it, so the settle before the main pass does not wait for it;
    // lands after the main pass read its block (tick 1), and only its
    // completion is seen. A traced write keeps the rounds going past it.
    let write = Write {
        queue_at: None,
        counted: false,
        ..Write::at(0, 3, 0, 6, 6)
    };
    let mut sim = Sim::new(4, vec![write, Write::at(3, 9, 5, 8, 8)]);
    assert_eq!(run(&mut sim, false), Ending::Converged);
    assert_eq!(sim.image[0], 3);
    assert_exact(&sim);
}

fn never_completing(count: u32) -> Vec<Write> {
    (0..count)
        .map(|i| Write {
            complete_at: None,
            ..Write::at(u64::from(i % 8), i + 1, 5 + i, 6 + i, 6 + i)
        })
        .collect()
}

#[test]
fn a_device_that_never_completes_in_range_ends_without_vouching() {
    let mut sim = Sim::new(8, never_completing(10));
    match run(&mut sim, false) {
        Ending::NoCompletions(Completions::Missing { waited, .. }) => {
            assert!(waited >= COMPLETION_WAIT_NONE_SEEN)
        }
        other => panic!("expected NoCompletions, got {other:?}"),
    }
}

#[test]
fn a_device_that_never_completes_in_range_converges_under_freeze() {
    let mut sim = Sim::new(8, never_completing(10));
    // A freeze threshold no round meets: the run freezes once the device
    // is found out, and its promise then rests on the freeze.
    let mut rounds = Rounds::new(RoundsConfig {
        freeze_dirty_bytes_max: 0,
        ..config(true)
    });
    let mut stats = Vec::new();
    let ending = catch_up(&mut sim, &mut rounds, &mut stats, 8 * BLOCK_BYTES).unwrap();
    assert_eq!(ending, Ending::Converged);
    assert!(rounds.is_frozen());
    assert_exact(&sim);
}

#[test]
fn writes_that_never_stop_end_unconverged() {
    let writes = (0..2000)
        .map(|i| Write::at(u64::from(i % 4), i + 1, 5 + i, 5 + i, 6 + i))
        .collect();
    let mut sim = Sim::new(4, writes);
    assert!(matches!(run(&mut sim, false), Ending::Unconverged { .. }));
}

#[test]
fn out_of_rounds_counts_what_the_last_look_took_as_changed() {
    // Nothing marks a block between the last look and the count: what it
    // says changed is what that look took, put back unread.
    let writes = (0..2000)
        .map(|i| Write::at(u64::from(i % 4), i + 1, 5 + i, 5 + i, 6 + i))
        .collect();
    let mut sim = Sim::new(4, writes);
    let Ending::Unconverged { changed_bytes } = run(&mut sim, false) else {
        panic!("writes that never stop converged");
    };
    assert!(changed_bytes >= BLOCK_BYTES, "{changed_bytes}");
    assert_eq!(changed_bytes, sim.dirty.len() as u64 * BLOCK_BYTES);
}

#[test]
fn held_rounds_do_not_count() {
    let writes = (0..100)
        .map(|i| Write::at(u64::from(i % 4), i + 1, 5 + i * 2, 5 + i * 2, 6 + i * 2))
        .collect();
    let mut sim = Sim::new(4, writes);
    sim.held_until = 220;
    assert_eq!(run(&mut sim, false), Ending::Converged);
    assert!(sim.tick >= 220);
    assert_exact(&sim);
}

/// A look that took `extent_count` extents of `dirty_bytes` in a whole
/// pass, with nothing pending or in flight, not held, not frozen.
fn look(dirty_bytes: u64, extent_count: usize) -> Look {
    Look {
        dirty_bytes,
        extent_count,
        pass_complete: true,
        pass_whole: true,
        pending: PendingSummary {
            sectors: 0,
            stalest: None,
        },
        completions: Completions::Reported,
        writes_in_flight: 0,
        held: false,
        hold_frozen: false,
        frozen: false,
        now: Instant::now(),
    }
}

#[test]
fn policy_freezes_when_the_dirty_set_is_small() {
    let mut rounds = Rounds::new(RoundsConfig {
        freeze_dirty_bytes_max: 1 << 20,
        ..config(true)
    });
    let small = look(4096, 1);
    assert_eq!(rounds.decide(&small), Step::Freeze);
    assert!(rounds.is_frozen());
    assert_eq!(rounds.decide(&small), Step::Read { remark: false });
    let quiet = Look {
        frozen: true,
        ..look(0, 0)
    };
    assert_eq!(rounds.decide(&quiet), Step::Converged);
}

#[test]
fn a_freeze_that_ends_early_is_not_taken_again_and_cannot_vouch_for_missing_completions() {
    let base = look(4096, 1);
    // A device that reports completions: after the early thaw, the normal
    // rules; a small dirty set does not freeze again.
    let mut rounds = Rounds::new(RoundsConfig {
        freeze_dirty_bytes_max: 1 << 20,
        ..config(true)
    });
    assert_eq!(rounds.decide(&base), Step::Freeze);
    let thawed = Look {
        frozen: false,
        ..base
    };
    assert_eq!(rounds.decide(&thawed), Step::Read { remark: false });
    assert!(rounds.freeze_spent() && !rounds.is_frozen());
    let quiet = Look {
        dirty_bytes: 0,
        extent_count: 0,
        ..thawed
    };
    assert_eq!(rounds.decide(&quiet), Step::Converged);

    // A device that does not: the freeze was its only promise.
    let mut rounds = Rounds::new(config(true));
    let missing = Look {
        completions: Completions::Missing {
            sector_first: Some(0),
            waited: Duration::from_secs(3),
            matched_total: 0,
        },
        ..base
    };
    assert_eq!(rounds.decide(&missing), Step::Freeze);
    let frozen = Look {
        frozen: true,
        ..missing
    };
    assert_eq!(rounds.decide(&frozen), Step::Read { remark: false });
    assert_eq!(rounds.decide(&missing), Step::NoCompletions);
}

#[test]
fn policy_waits_on_pending_writes_and_on_inflight() {
    let mut rounds = Rounds::new(config(false));
    let quiet = look(0, 0);
    let now = quiet.now;
    let pending = Look {
        pending: PendingSummary {
            sectors: 8,
            stalest: Some((0, now)),
        },
        ..quiet
    };
    assert_eq!(rounds.decide(&pending), Step::Wait);
    let inflight = Look {
        writes_in_flight: 1,
        ..quiet
    };
    assert_eq!(rounds.decide(&inflight), Step::Wait);
    assert_eq!(rounds.decide(&quiet), Step::Converged);
}

fn arb_writes() -> impl Strategy<Value = Vec<Write>> {
    // Mostly writes queued after the settle, racing the main pass (which
    // starts a few ticks in) and the rounds; some queued before tracing
    // or during the settle.
    let queue = prop_oneof![
        1 => Just(None),
        1 => (0u32..25).prop_map(Some),
        6 => (20u32..150).prop_map(Some),
    ];
    let write = (0u64..6, queue, 0u32..30, 0u32..10, any::<bool>()).prop_map(
        |(block, queue_at, land_delay, complete_delay, counted)| {
            let land = queue_at.unwrap_or(0) + land_delay;
            Write {
                block,
                value: 0, // numbered below
                queue_at,
                land_at: land,
                complete_at: Some(land + complete_delay),
                counted,
            }
        },
    );
    prop::collection::vec(write, 0..40).prop_map(|mut writes| {
        for (i, w) in writes.iter_mut().enumerate() {
            w.value = i as u32 + 1;
        }
        writes
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 400,
        max_global_rejects: 8192,
        ..ProptestConfig::default()
    })]

    /// On a device that reports completions, whatever the order of queue,
    /// landing and completion against the reads, a converged run's image
    /// is the device as of the final look.
    #[test]
    fn converged_images_are_exact(writes in arb_writes(), batch in prop_oneof![Just(usize::MAX), 1usize..3]) {
        let mut sim = Sim::new(6, writes);
        sim.batch = batch;
        prop_assume!(!sim.has_unrevealable_write());
        match run(&mut sim, false) {
            Ending::Converged => assert_exact(&sim),
            Ending::Unconverged { .. } => {}
            Ending::NoCompletions(c) => prop_assert!(false, "no completions: {c:?}"),
        }
    }
}
