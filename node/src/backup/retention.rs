//! Which backups to keep after a new one: pure, so the rules are property tests.
//!
//! In order: backups older than `maxAge` go; with `tiered`, of the rest only the newest of
//! each hour of the last day, of each day of the last week and of each week of the last
//! month stay (the newest backup always counts as its hour's); then at most `maxCount`, the
//! newest ones. One backup is never deleted whatever the rules say: the newest verified one
//! (the newest that restored and matched), or the newest of all while none is verified, so
//! a cluster always keeps its last known-good restore point. Choosing within `maxCount`, it
//! takes the place of the oldest.

use std::collections::BTreeSet;
use std::time::Duration;

use jiff::Timestamp;

/// One stored backup, as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub name: String,
    pub taken: Timestamp,
    /// `Some(true)` once restored and matched, `Some(false)` when that failed, `None`
    /// while not checked.
    pub verified: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// At least 1.
    pub max_count: usize,
    pub max_age: Option<Duration>,
    pub tiered: bool,
}

const HOUR: i64 = 3600;
const DAY: i64 = 24 * HOUR;
const WEEK: i64 = 7 * DAY;
/// Windows of the tiers: (bucket width, how far back), newest first.
const TIERS: [(i64, i64); 3] = [(HOUR, DAY), (DAY, WEEK), (WEEK, 30 * DAY)];

/// The names of the backups to delete from `stored` at `now`.
pub fn to_delete(stored: &[Stored], policy: &Policy, now: Timestamp) -> BTreeSet<String> {
    let mut newest_first: Vec<&Stored> = stored.iter().collect();
    newest_first.sort_by(|a, b| b.taken.cmp(&a.taken).then_with(|| b.name.cmp(&a.name)));
    let protected = newest_first
        .iter()
        .find(|b| b.verified == Some(true))
        .or_else(|| newest_first.first())
        .map(|b| b.name.clone());

    let young = |b: &&Stored| {
        policy.max_age.is_none_or(|age| {
            let age = i64::try_from(age.as_secs()).unwrap_or(i64::MAX);
            now.as_second().saturating_sub(b.taken.as_second()) <= age
        })
    };
    let mut kept: Vec<&Stored> = newest_first.iter().copied().filter(young).collect();
    if policy.tiered {
        kept = tiers(&kept, now);
    }
    kept.truncate(policy.max_count.max(1));
    if let Some(protected) = &protected
        && !kept.iter().any(|b| &b.name == protected)
    {
        if kept.len() >= policy.max_count.max(1) {
            kept.pop();
        }
        kept.extend(newest_first.iter().copied().filter(|b| &b.name == protected));
    }
    let kept: BTreeSet<&str> = kept.iter().map(|b| b.name.as_str()).collect();
    stored.iter().filter(|b| !kept.contains(b.name.as_str())).map(|b| b.name.clone()).collect()
}

/// Of `newest_first`, the newest in each tier bucket within its window; the newest of all
/// always, as the first of its hour.
fn tiers<'a>(newest_first: &[&'a Stored], now: Timestamp) -> Vec<&'a Stored> {
    let mut seen: BTreeSet<(i64, i64)> = BTreeSet::new();
    newest_first
        .iter()
        .copied()
        .enumerate()
        .filter(|(i, backup)| {
            let age = now.as_second().saturating_sub(backup.taken.as_second());
            let mut keep = *i == 0;
            for (width, window) in TIERS {
                if age <= window && seen.insert((width, backup.taken.as_second().div_euclid(width))) {
                    keep = true;
                }
            }
            keep
        })
        .map(|(_, backup)| backup)
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn at(seconds_ago: i64) -> Timestamp {
        Timestamp::from_second(NOW - seconds_ago).expect("a time")
    }

    fn backup(name: &str, seconds_ago: i64, verified: Option<bool>) -> Stored {
        Stored { name: name.to_owned(), taken: at(seconds_ago), verified }
    }

    fn policy(max_count: usize, max_age: Option<u64>, tiered: bool) -> Policy {
        Policy { max_count, max_age: max_age.map(Duration::from_secs), tiered }
    }

    fn names(set: &BTreeSet<String>) -> Vec<&str> {
        set.iter().map(String::as_str).collect()
    }

    #[test]
    fn by_count_the_oldest_go() {
        let stored: Vec<Stored> =
            (0..5).map(|i| backup(&format!("b{i}"), (5 - i) * HOUR, Some(true))).collect();
        assert_eq!(names(&to_delete(&stored, &policy(3, None, false), at(0))), ["b0", "b1"]);
    }

    #[test]
    fn by_age_the_old_go_but_never_the_last_good_one() {
        let stored = vec![
            backup("old", 10 * DAY, Some(true)),
            backup("older", 11 * DAY, Some(true)),
            backup("new", HOUR, None),
        ];
        // "new" is not verified yet: the newest verified one stays, however old.
        assert_eq!(names(&to_delete(&stored, &policy(7, Some(7 * DAY as u64), false), at(0))), ["older"]);
        let verified = vec![backup("old", 10 * DAY, Some(true)), backup("new", HOUR, Some(true))];
        assert_eq!(names(&to_delete(&verified, &policy(7, Some(7 * DAY as u64), false), at(0))), ["old"]);
    }

    #[test]
    fn a_backup_that_failed_verification_never_displaces_the_last_good_one() {
        let stored = vec![backup("good", 2 * HOUR, Some(true)), backup("bad", HOUR, Some(false))];
        assert_eq!(names(&to_delete(&stored, &policy(1, None, false), at(0))), ["bad"]);
    }

    #[test]
    fn tiers_keep_the_newest_of_each_hour_day_and_week() {
        // Every 20 minutes for 40 days.
        let stored: Vec<Stored> =
            (0..40 * 72).map(|i| backup(&format!("b{i:05}"), i * 20 * 60, Some(true))).collect();
        let deleted = to_delete(&stored, &policy(10_000, None, true), at(0));
        let kept: Vec<&Stored> = stored.iter().filter(|b| !deleted.contains(&b.name)).collect();
        // About 24 hourly + 6 more daily + 3 more weekly (buckets are aligned to the epoch,
        // so a window's edges may add one each).
        assert!((30..=38).contains(&kept.len()), "{} kept", kept.len());
        assert!(kept.iter().all(|b| NOW - b.taken.as_second() <= 30 * DAY));
        assert_eq!(kept[0].name, "b00000", "the newest is kept");
    }

    fn arb_stored() -> impl Strategy<Value = Vec<Stored>> {
        prop::collection::vec((0..60 * DAY, prop::option::of(any::<bool>())), 0..40).prop_map(|items| {
            items
                .into_iter()
                .enumerate()
                .map(|(i, (ago, verified))| backup(&format!("b{i:02}"), ago, verified))
                .collect()
        })
    }

    fn arb_policy() -> impl Strategy<Value = Policy> {
        (1usize..12, prop::option::of(HOUR as u64..40 * DAY as u64), any::<bool>())
            .prop_map(|(count, age, tiered)| policy(count, age, tiered))
    }

    proptest! {
        #[test]
        fn never_more_than_max_count_and_always_the_last_good_one(stored in arb_stored(), policy in arb_policy()) {
            let deleted = to_delete(&stored, &policy, at(0));
            let kept: Vec<&Stored> = stored.iter().filter(|b| !deleted.contains(&b.name)).collect();
            prop_assert!(kept.len() <= policy.max_count);
            prop_assert!(deleted.iter().all(|name| stored.iter().any(|b| &b.name == name)));
            let newest = |only_verified: bool| {
                stored
                    .iter()
                    .filter(|b| !only_verified || b.verified == Some(true))
                    .max_by(|a, b| a.taken.cmp(&b.taken).then_with(|| a.name.cmp(&b.name)))
            };
            match newest(true).or_else(|| newest(false)) {
                Some(protected) => prop_assert!(!deleted.contains(&protected.name), "{} deleted", protected.name),
                None => prop_assert!(stored.is_empty()),
            }
        }

        #[test]
        fn nothing_older_than_max_age_is_kept_but_the_last_good_one(stored in arb_stored(), policy in arb_policy()) {
            let deleted = to_delete(&stored, &policy, at(0));
            let Some(age) = policy.max_age else { return Ok(()) };
            let old: Vec<&Stored> = stored
                .iter()
                .filter(|b| !deleted.contains(&b.name) && NOW - b.taken.as_second() > age.as_secs() as i64)
                .collect();
            prop_assert!(old.len() <= 1, "{old:?}");
        }

        #[test]
        fn applying_it_again_deletes_nothing_more(stored in arb_stored(), policy in arb_policy()) {
            let deleted = to_delete(&stored, &policy, at(0));
            let kept: Vec<Stored> = stored.iter().filter(|b| !deleted.contains(&b.name)).cloned().collect();
            prop_assert!(to_delete(&kept, &policy, at(0)).is_empty());
        }
    }
}
