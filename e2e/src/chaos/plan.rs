//! The seeded fault plan of a chaos run: which fault, on which member, when and for how long.
//! Pure: the same seed and classes give the same plan, so a failing run is replayed by its seed.

use std::time::Duration;

/// A kind of fault; `make chaos CLASSES=...` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultClass {
    /// kill -9, then a restart from the same data directory.
    Kill,
    /// SIGSTOP, then SIGCONT: a paused leader must not serve stale reads when it wakes.
    Pause,
    /// The member cut off from every other member on the peer links (clients still reach it).
    Partition,
    /// Every peer link of the member delayed.
    Delay,
    /// Restarted on a slow disk (every fdatasync of its log delayed) or a failing one (the first
    /// fdatasync fails), then restarted on a good one.
    Fsync,
    /// Removed from the cluster, its data deleted, added back as a learner and promoted.
    Membership,
}

pub const ALL_CLASSES: [FaultClass; 6] = [
    FaultClass::Kill,
    FaultClass::Pause,
    FaultClass::Partition,
    FaultClass::Delay,
    FaultClass::Fsync,
    FaultClass::Membership,
];

impl FaultClass {
    pub fn name(self) -> &'static str {
        match self {
            FaultClass::Kill => "kill",
            FaultClass::Pause => "pause",
            FaultClass::Partition => "partition",
            FaultClass::Delay => "delay",
            FaultClass::Fsync => "fsync",
            FaultClass::Membership => "membership",
        }
    }

    pub fn parse(name: &str) -> Result<Self, String> {
        ALL_CLASSES.into_iter().find(|c| c.name() == name).ok_or_else(|| {
            let known: Vec<&str> = ALL_CLASSES.iter().map(|c| c.name()).collect();
            format!("unknown fault class {name:?}; the classes are {}", known.join(", "))
        })
    }
}

/// Which member a fault hits, decided when it starts (the leader may have moved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Leader,
    Follower,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub class: FaultClass,
    pub target: Target,
    /// From the start of the load.
    pub at: Duration,
    /// How long the fault lasts before it is healed.
    pub hold: Duration,
    /// Fsync: a failing disk rather than a slow one.
    pub failing: bool,
}

/// SplitMix64: small, seedable, and the same everywhere.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from + 1))
    }
}

/// The faults of one run of `length`, one after another: each held 1-3 s, then healed and
/// given 1-2 s for the cluster to settle, the last healed 4 s before the end so the final
/// reads meet a cluster that serves.
pub fn plan(seed: u64, classes: &[FaultClass], length: Duration) -> Vec<Fault> {
    let mut rng = Rng::new(seed);
    let mut faults = Vec::new();
    if classes.is_empty() {
        return faults;
    }
    let mut at = rng.millis(1000, 2000);
    loop {
        let class = classes[rng.below(classes.len() as u64) as usize];
        let hold = match class {
            // A removal and re-add needs the time to catch up; it is not held, it is done.
            FaultClass::Membership => Duration::ZERO,
            _ => rng.millis(1000, 3000),
        };
        if at + hold + Duration::from_secs(4) > length {
            break;
        }
        let target = if rng.below(2) == 0 { Target::Leader } else { Target::Follower };
        faults.push(Fault { class, target, at, hold, failing: rng.below(2) == 0 });
        at += hold + rng.millis(1000, 2000);
    }
    faults
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_plan_and_another_seed_another() {
        let length = Duration::from_secs(30);
        assert_eq!(plan(7, &ALL_CLASSES, length), plan(7, &ALL_CLASSES, length));
        assert_ne!(plan(7, &ALL_CLASSES, length), plan(8, &ALL_CLASSES, length));
    }

    #[test]
    fn faults_come_one_at_a_time_and_all_are_healed_before_the_end() {
        for seed in 0..200 {
            let length = Duration::from_secs(25);
            let faults = plan(seed, &ALL_CLASSES, length);
            assert!(!faults.is_empty(), "seed {seed}");
            for pair in faults.windows(2) {
                assert!(
                    pair[0].at + pair[0].hold + Duration::from_secs(1) <= pair[1].at,
                    "seed {seed}: {pair:?}"
                );
            }
            let last = faults.last().expect("a fault");
            assert!(last.at + last.hold + Duration::from_secs(4) <= length, "seed {seed}");
        }
    }

    #[test]
    fn only_the_classes_asked_for_are_planned() {
        let faults = plan(3, &[FaultClass::Pause], Duration::from_secs(30));
        assert!(faults.iter().all(|f| f.class == FaultClass::Pause));
        assert_eq!(FaultClass::parse("partition"), Ok(FaultClass::Partition));
        assert!(FaultClass::parse("flood").unwrap_err().contains("kill, pause"));
    }
}
