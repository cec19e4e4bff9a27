//! Which seeds run, and with which shapes: the range asked for, plus the seeds that found bugs.

use std::collections::BTreeSet;

use crate::observe::Rng;

/// The shapes a seed runs with, beyond the classic schedule. Drawn per seed from a generator
/// of their own, so a seed without any shape replays the classic simulation exactly (the
/// schedules that found the bugs in [`BUG_SEEDS`] included).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Shapes {
    /// Processors buffer records and checkpoint only what they flushed (see [`Buffering`]).
    pub(crate) buffering: bool,
    /// Lease scans read the table in pages while writes land (see [`ScanPaging`]).
    pub(crate) paged_scans: bool,
    /// Single renewals and checkpoints hang until their caller gives up (see [`Hang`]).
    pub(crate) hangs: bool,
    /// Taking rounds scan with eventual consistency, items lagging (see [`StaleReads`]).
    pub(crate) stale_scans: bool,
    /// A few workers watch the table; the others read it rarely (`LeaseConfig::watchers`).
    pub(crate) watchers: bool,
}

impl Shapes {
    pub(crate) const CLASSIC: Shapes = Shapes {
        buffering: false,
        paged_scans: false,
        hangs: false,
        stale_scans: false,
        watchers: false,
    };
    const BUFFERING: Shapes = Shapes {
        buffering: true,
        ..Shapes::CLASSIC
    };
    const SCANS: Shapes = Shapes {
        paged_scans: true,
        ..Shapes::CLASSIC
    };
    const HANGS: Shapes = Shapes {
        hangs: true,
        ..Shapes::CLASSIC
    };

    /// Each shape in about half the seeds. Stale scans, added later, are drawn from their
    /// own generator, so the other shapes (and whatever else `rng` draws next) stay as they
    /// were for every seed.
    pub(crate) fn draw(rng: &mut Rng, stale_rng: &mut Rng, watchers_rng: &mut Rng) -> Self {
        Shapes {
            buffering: rng.chance(50),
            paged_scans: rng.chance(50),
            hangs: rng.chance(50),
            stale_scans: stale_rng.chance(50),
            watchers: watchers_rng.chance(50),
        }
    }

    /// `SIM_SHAPES`, if set: `classic`, or a comma-separated list of the shapes to run.
    fn from_env() -> Option<Self> {
        let list = std::env::var("SIM_SHAPES")
            .ok()
            .filter(|s| !s.trim().is_empty())?;
        let mut shapes = Shapes::CLASSIC;
        for shape in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match shape {
                "classic" => {}
                "buffering" => shapes.buffering = true,
                "scans" => shapes.paged_scans = true,
                "hangs" => shapes.hangs = true,
                "stale" => shapes.stale_scans = true,
                "watchers" => shapes.watchers = true,
                other => panic!(
                    "SIM_SHAPES: unknown shape {other:?} (classic, buffering, scans, hangs, stale, \
                     watchers)"
                ),
            }
        }
        Some(shapes)
    }
}

/// Salts the generator of a seed's shapes, so it is independent of the schedule's.
pub(crate) const SHAPES_SALT: u64 = 0x5EED_5A9E_0000_0001;
/// Salts the generator of a seed's stale scans (whether, and how stale).
pub(crate) const STALE_SALT: u64 = 0x5EED_57A1_0000_0003;
/// Salts the generator of a seed's watchers (whether, how many, their intervals).
pub(crate) const WATCHERS_SALT: u64 = 0x5EED_3A7C_0000_0004;
/// Salts the generator that draws how a seed's fleet reads and, in fan-out fleets, the
/// fan-out settings and faults: independent of the schedule's and the shapes' generators, so a
/// polling seed replays as before fan-out existed, and a fan-out seed has the same schedule
/// (workers, records, resharding, other faults) as the same seed polling.
pub(crate) const FAN_OUT_SALT: u64 = 0x5EED_FA40_0000_0002;

/// How the workers of a seed's fleet read: all of them poll, or all use enhanced fan-out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Reading {
    Polling,
    FanOut,
}

impl Reading {
    /// Fan-out in about half the seeds. Always the first draw of the fan-out generator (even
    /// when the reading is fixed), so a fan-out seed replays alike whether drawn or fixed.
    pub(crate) fn draw(rng: &mut Rng) -> Self {
        if rng.chance(50) {
            Reading::FanOut
        } else {
            Reading::Polling
        }
    }

    /// `SIM_RETRIEVAL`, if set: `polling` or `fan-out`.
    fn from_env() -> Option<Self> {
        let value = std::env::var("SIM_RETRIEVAL")
            .ok()
            .filter(|s| !s.trim().is_empty())?;
        match value.trim() {
            "polling" => Some(Reading::Polling),
            "fan-out" | "fanout" => Some(Reading::FanOut),
            other => panic!("SIM_RETRIEVAL: unknown retrieval {other:?} (polling, fan-out)"),
        }
    }
}

/// A seed to run, with its shapes and its fleet's reading (`None`: drawn from the seed).
pub(crate) type Job = (u64, Option<Shapes>, Option<Reading>);

/// `SIM_RETRIEVAL` (see [`Reading`]), for the jobs that do not fix it themselves.
pub(crate) fn reading_from_env() -> Option<Reading> {
    Reading::from_env()
}

pub(crate) fn seeds() -> Vec<Job> {
    let shapes = Shapes::from_env();
    let reading = Reading::from_env();
    if let Ok(seed) = std::env::var("SIM_SEED") {
        return vec![(seed.parse().expect("SIM_SEED is a number"), shapes, reading)];
    }
    let number = |name: &str| {
        std::env::var(name).ok().map(|s| {
            s.parse::<u64>()
                .unwrap_or_else(|_| panic!("{name} is a number"))
        })
    };
    let first = number("SIM_FIRST_SEED").unwrap_or(0);
    let range = first..first + number("SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let mut jobs: BTreeSet<Job> = range.map(|seed| (seed, shapes, reading)).collect();
    // The bugs replay on the schedules that found them, polling as they were found (fan-out
    // came later).
    let polling = Some(Reading::Polling);
    if reading.is_none_or(|r| r == Reading::Polling) {
        jobs.extend(BUG_SEEDS.map(|seed| (seed, Some(Shapes::CLASSIC), polling)));
        if shapes.is_none() {
            jobs.extend(SHAPE_BUG_SEEDS.map(|(seed, shapes)| (seed, Some(shapes), polling)));
            jobs.extend(DRAWN_BUG_SEEDS.map(|seed| (seed, None, polling)));
        }
    }
    if shapes.is_none() {
        jobs.extend(
            READING_BUG_SEEDS
                .into_iter()
                .filter(|(_, r)| reading.is_none_or(|fixed| fixed == *r))
                .map(|(seed, r)| (seed, None, Some(r))),
        );
    }
    jobs.into_iter().collect()
}

/// Seeds that found bugs in the worker, run every time with the classic shapes: a hot scan
/// loop after a failed lease scan (21, 35); a shard sync combining an old shard list with newer
/// leases, which created leases again for cleaned-up ancestors (9155, 36736, 37196); a merged
/// child created before its other parent had a lease, started early (10888, 26385).
const BUG_SEEDS: [u64; 7] = [21, 35, 9155, 10888, 26385, 36736, 37196];
/// Seeds that found the defects of issue 9 on the code before their fixes, run every time with
/// the one shape that found each (`SIM_SHAPES=<shape> SIM_SEED=<seed>` replays one):
/// - a panic loses what a buffering processor had not flushed (1), `buffering`: 19 21 52 64
///   112 153 199 252 (and 34 117 140 152 197 237 together with 2);
/// - `SHARD_END` written over a buffering processor's unflushed tail (2), `buffering`: 67 of
///   seeds 0..300, 4 5 11 18 23 26 39 40 41 44 56 59 60 ...;
/// - a child started before its parent, missing from a paged scan (4), `scans`: 16 189 208
///   215 221 246 299 (of 0..400);
/// - one hung renewal or checkpoint loses a lease (5), `hangs`: 72 of seeds 0..300, 3 6 8 12
///   26 27 30 40 49 51 59 67 ...
///
/// With the shapes drawn per seed (as CI runs), seeds 0..500 found: 1 in 16 153 259 395 (and
/// 389, as a key first flushed out of order); 2 in 0 24 27 33 38 59 89 93 95 97 98 102 109
/// 138 173 212 253 254 308 328 345 352 357 369 378 380 387 391 408 416 417 434 459 463 481;
/// 4 in 167 214 344 491; 5 in 8 10 36 47 58 64 78 88 112 121 125 135 158 159 180 192 194 195
/// 200 240 261 262 270 293 298 301 304 318 343 346 347 422 436 450 453 467 483 488 496 497.
const SHAPE_BUG_SEEDS: [(u64, Shapes); 22] = [
    (19, Shapes::BUFFERING),
    (21, Shapes::BUFFERING),
    (52, Shapes::BUFFERING),
    (64, Shapes::BUFFERING),
    (112, Shapes::BUFFERING),
    (153, Shapes::BUFFERING),
    (199, Shapes::BUFFERING),
    (252, Shapes::BUFFERING),
    (4, Shapes::BUFFERING),
    (5, Shapes::BUFFERING),
    (11, Shapes::BUFFERING),
    (16, Shapes::SCANS),
    (189, Shapes::SCANS),
    (208, Shapes::SCANS),
    (215, Shapes::SCANS),
    (221, Shapes::SCANS),
    (246, Shapes::SCANS),
    (299, Shapes::SCANS),
    (3, Shapes::HANGS),
    (6, Shapes::HANGS),
    (8, Shapes::HANGS),
    (12, Shapes::HANGS),
];
/// Seeds that found bugs with their shapes drawn per seed (as CI runs them): a worker started
/// during a lease-store outage ended with the first shard sync's transient error, and the fleet
/// never balanced (5591, 13385; found by a 20,000-seed soak after issue 9's fixes). A worker
/// whose resend on an adopted fence was throttled kept its old fence with a reset count of
/// unanswered writes, and took its own late write for another process using its worker id
/// (1013, 455, 555; found by a 6,000-seed soak while adding that detection in issue 10). A
/// lease whose release failed stayed renewable after the worker let go of it, and its stray
/// renewal met the worker's own next take of it as another process's write (6447). A worker
/// took back a lease whose old consumer was still stopping, two consumers of one shard in one
/// worker (12271; found by a 20,000-seed soak).
const DRAWN_BUG_SEEDS: [u64; 7] = [455, 555, 1013, 5591, 6447, 12271, 13385];
/// Seeds that found bugs since fleets read through fan-out too, with their shapes drawn and
/// the reading they failed in: a worker whose pending hangs struck two or more consecutive
/// renewals (hangs asked for while it held no lease wait for its next renewals) lost a lease
/// as it should, which invariant 8 took for a bug (87189 polling; 90391 fails polling too;
/// found by a 50,000-seed soak). The invariant now excuses two hung renewals within 20 s. A
/// fan-out worker started into pauses and stalls could not describe its consumer for 60 s
/// and ended with `ConsumerNotActive` (the default registration timeout, by design), and the
/// fleet never balanced (52303; fan-out fleets now wait up to 10 minutes). A worker whose
/// shard-end checkpoint landed unanswered resent it after the other workers had processed the
/// children and deleted their finished leases, and created the children again: their records
/// delivered twice and a merge child started before its re-created parent ended (42914,
/// 225247; found by a 200,000-seed soak). Finished leases now wait for their parents' leases
/// to go, and leases are created only while their lineage allows it (invariant 10).
const READING_BUG_SEEDS: [(u64, Reading); 5] = [
    (87189, Reading::Polling),
    (90391, Reading::FanOut),
    (52303, Reading::FanOut),
    (42914, Reading::FanOut),
    (225247, Reading::FanOut),
];
/// Seeds per CI run: about half a minute on two threads of an unoptimized build. (3,000 before
/// fan-out fleets; a fan-out seed costs about a quarter more than a polling one, and half the
/// seeds are fan-out, so 2,600 keep the time.)
pub(crate) const DEFAULT_SEEDS: u64 = 2_600;
