//! Retention: which sessions a set of `keep` rules keeps, and why.
//!
//! A pure function ([`decide`]) from the sessions of a volume (oldest first)
//! and [`KeepRules`] to one [`Decision`] per session. It reads no files and
//! changes nothing; the caller prunes the sessions it marks.
//!
//! The rules are those of borg, restic and Proxmox Backup ("keep-daily" and
//! friends), which thin old backups out like Time Machine does:
//!
//! - Sessions must be given oldest first. Their names are UTC date-times, so
//!   that is name order; input that is not strictly increasing is an error.
//! - `last = N` keeps the N newest sessions.
//! - `hourly`, `daily`, `weekly`, `monthly`, `yearly = N`: the sessions are
//!   grouped by their UTC hour, day, ISO week, month or year, and the newest
//!   session of each of the N most recent periods **that have sessions** is
//!   kept. Periods without sessions do not count: `daily = 7` keeps the last
//!   seven days on which there were backups, however long ago, so a pause in
//!   backups never ages the old ones out. Weeks are ISO 8601 weeks (Monday to
//!   Sunday, numbered within the ISO year), so the days around New Year can
//!   belong to a week of the other year: 2021-01-03 is in 2020-W53. Periods
//!   are UTC, not local time.
//! - A session kept by several rules lists every one of them, in the order
//!   last, hourly, daily, weekly, monthly, yearly.
//! - Tagged sessions (non-empty tags) are always kept; the reason shown is
//!   their tags, even when rules also keep them.
//! - The newest session is always kept, and its reason is only "newest"
//!   (every rule would keep it anyway: it is the newest of the most recent
//!   period; and pruning never removes the newest session).
//! - With every rule 0 there is nothing to keep by, and [`decide`] fails with
//!   "no keep rule given" rather than prune all but the newest session.
//! - Every other session is pruned.
//!
//! The rules are applied to the sessions that exist now, each time. Pruning a
//! session merges its data forward into the next newer session, so a kept
//! session still restores exactly the same volume content after its older
//! neighbours are pruned: a daily rule keeps the state at the end of each day.
//! Because a kept session is the newest of its period and the periods it
//! competes with only ever get older, two things follow (and are tested):
//! - running the same rules again on what is left prunes nothing more;
//! - pruning after every backup ends with the same sessions, for the same
//!   reasons, as keeping every backup and pruning once at the end.

use super::SessionId;
use anyhow::{bail, Context, Result};
use chrono::{Datelike, NaiveDate, NaiveDateTime, Timelike};
use std::fmt;

/// How many of each period to keep: given by `prune --keep-*` or the
/// config's `[retention]`, so it is defined with the config (the bottom
/// layer) and only read here.
pub use crate::config::KeepRules;

/// The kind of a keep rule. `Last` counts sessions; the others count the
/// UTC hours, days, ISO weeks, months or years that have sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Period {
    /// Every kind, in the order reasons list them.
    pub const ALL: [Period; 6] =
        [Period::Last, Period::Hourly, Period::Daily, Period::Weekly, Period::Monthly, Period::Yearly];

    /// How many periods of this kind `rules` keeps (0: the rule is off).
    pub fn count_in(self, rules: &KeepRules) -> u32 {
        match self {
            Period::Last => rules.last,
            Period::Hourly => rules.hourly,
            Period::Daily => rules.daily,
            Period::Weekly => rules.weekly,
            Period::Monthly => rules.monthly,
            Period::Yearly => rules.yearly,
        }
    }

    /// The rule's name in output and config keys: "last", "hourly", ...
    pub fn name(self) -> &'static str {
        match self {
            Period::Last => "last",
            Period::Hourly => "hourly",
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Yearly => "yearly",
        }
    }

    /// Which period of this kind the session at `index`, taken at `time`,
    /// falls in. Sessions of one period are consecutive in time order, so
    /// comparing neighbours is enough to find where a period starts.
    fn key(self, index: usize, time: &NaiveDateTime) -> PeriodKey {
        let date = time.date();
        match self {
            Period::Last => PeriodKey::Session(index),
            Period::Hourly => PeriodKey::Hour(date, time.hour()),
            Period::Daily => PeriodKey::Day(date),
            Period::Weekly => {
                let week = date.iso_week();
                PeriodKey::Week(week.year(), week.week())
            }
            Period::Monthly => PeriodKey::Month(date.year(), date.month()),
            Period::Yearly => PeriodKey::Year(date.year()),
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One period of one kind; only compared for equality.
#[derive(Debug, PartialEq, Eq)]
enum PeriodKey {
    /// `last` treats every session as a period of its own.
    Session(usize),
    Hour(NaiveDate, u32),
    Day(NaiveDate),
    /// ISO year and ISO week number.
    Week(i32, u32),
    Month(i32, u32),
    Year(i32),
}

/// Why a session stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeepReason {
    /// The newest session of the volume (always kept).
    Newest,
    /// The session's tags (tagged sessions are always kept).
    Tagged(Vec<String>),
    /// Every rule that keeps it, in the order of [`Period::ALL`]; never empty.
    Rule(Vec<Period>),
}

/// As `prune --dry-run` shows it in `keep (...)`: "newest", "tagged a,b",
/// or the rules, "last, daily".
impl fmt::Display for KeepReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeepReason::Newest => f.write_str("newest"),
            KeepReason::Tagged(tags) => write!(f, "tagged {}", tags.join(",")),
            KeepReason::Rule(periods) => {
                let names: Vec<&str> = periods.iter().map(|p| p.name()).collect();
                f.write_str(&names.join(", "))
            }
        }
    }
}

/// A session to decide about.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub session: &'a SessionId,
    pub tags: &'a [String],
}

/// What happens to one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub session: SessionId,
    /// Why it is kept; `None`: prune it.
    pub keep: Option<KeepReason>,
}

impl Decision {
    pub fn is_kept(&self) -> bool {
        self.keep.is_some()
    }
}

/// The time a session was taken, from its name (UTC).
fn session_time(session: &SessionId) -> Result<NaiveDateTime> {
    // session.rs keeps its own parser private; this is the same format.
    NaiveDateTime::parse_from_str(session.date_time(), "%Y%m%d-%H%M%S")
        .with_context(|| format!("session name {session} is not a date-time"))
}

/// One decision per session, in the order given (oldest first). See the
/// module documentation for the rules.
pub fn decide(sessions: &[Candidate<'_>], rules: &KeepRules) -> Result<Vec<Decision>> {
    if rules.is_empty() {
        bail!("no keep rule given");
    }
    let times = sessions.iter().map(|c| session_time(c.session)).collect::<Result<Vec<_>>>()?;
    for (pair, time) in sessions.windows(2).zip(times.windows(2)) {
        if time[1] <= time[0] {
            bail!(
                "sessions must be given oldest first, without repeats: {} came before {}",
                pair[0].session,
                pair[1].session
            );
        }
    }

    // For each session, the rules that keep it, filled in Period::ALL order.
    let mut kept_by: Vec<Vec<Period>> = vec![Vec::new(); sessions.len()];
    for period in Period::ALL {
        let wanted = period.count_in(rules) as usize;
        if wanted == 0 {
            continue;
        }
        // Newest first: the first session met in a period is its newest.
        let mut periods_seen = 0;
        let mut current: Option<PeriodKey> = None;
        for (index, time) in times.iter().enumerate().rev() {
            let key = period.key(index, time);
            if current.as_ref() == Some(&key) {
                continue; // an older session of a period already counted
            }
            if periods_seen == wanted {
                break;
            }
            periods_seen += 1;
            kept_by[index].push(period);
            current = Some(key);
        }
    }

    let newest = sessions.len().checked_sub(1);
    let decisions = sessions
        .iter()
        .zip(kept_by)
        .enumerate()
        .map(|(index, (candidate, periods))| {
            let keep = if Some(index) == newest {
                Some(KeepReason::Newest)
            } else if !candidate.tags.is_empty() {
                Some(KeepReason::Tagged(candidate.tags.to_vec()))
            } else if !periods.is_empty() {
                Some(KeepReason::Rule(periods))
            } else {
                None
            };
            Decision { session: candidate.session.clone(), keep }
        })
        .collect();
    Ok(decisions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn time(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").expect("test time")
    }

    fn session_at(t: NaiveDateTime) -> SessionId {
        SessionId::from_user(&t.format("%Y%m%d-%H%M%S").to_string()).expect("session name")
    }

    fn sessions(times: &[&str]) -> Vec<SessionId> {
        times.iter().map(|t| session_at(time(t))).collect()
    }

    /// Runs `decide` on untagged sessions.
    fn decide_untagged(ids: &[SessionId], rules: &KeepRules) -> Result<Vec<Decision>> {
        let candidates: Vec<Candidate> = ids.iter().map(|session| Candidate { session, tags: &[] }).collect();
        decide(&candidates, rules)
    }

    /// The kept sessions as ("YYYY-MM-DD HH:MM:SS", reason), oldest first.
    fn kept(decisions: &[Decision]) -> Vec<(String, KeepReason)> {
        decisions
            .iter()
            .filter_map(|d| {
                let t = session_time(&d.session).expect("session time");
                d.keep.clone().map(|reason| (t.format("%Y-%m-%d %H:%M:%S").to_string(), reason))
            })
            .collect()
    }

    fn rule(periods: &[Period]) -> KeepReason {
        KeepReason::Rule(periods.to_vec())
    }

    fn tags(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn period_names() {
        let names: Vec<String> = Period::ALL.iter().map(|p| p.to_string()).collect();
        assert_eq!(names, ["last", "hourly", "daily", "weekly", "monthly", "yearly"]);
    }

    #[test]
    fn reasons_as_shown() {
        assert_eq!(KeepReason::Newest.to_string(), "newest");
        assert_eq!(KeepReason::Tagged(tags(&["a", "before-upgrade"])).to_string(), "tagged a,before-upgrade");
        assert_eq!(rule(&[Period::Last, Period::Daily, Period::Yearly]).to_string(), "last, daily, yearly");
    }

    #[test]
    fn time_machine_hourly_and_daily() {
        // A session every 20 minutes for 72 hours, 2026-03-01 10:00 to
        // 2026-03-04 09:40.
        let start = time("2026-03-01 10:00:00");
        let ids: Vec<SessionId> = (0..72 * 3).map(|i| session_at(start + TimeDelta::minutes(20 * i))).collect();
        let rules = KeepRules { hourly: 24, daily: 30, ..KeepRules::default() };
        let decisions = decide_untagged(&ids, &rules).expect("decide");
        assert_eq!(decisions.len(), ids.len());

        // daily: the end of each of the four days (only four have sessions);
        // hourly: the :40 session of each of the last 24 hours, from
        // 03-03 10:40 on; 03-03 23:40 is both; 03-04 09:40 is the newest.
        let mut want = vec![
            ("2026-03-01 23:40:00".to_string(), rule(&[Period::Daily])),
            ("2026-03-02 23:40:00".to_string(), rule(&[Period::Daily])),
        ];
        for hour in 10..=22 {
            want.push((format!("2026-03-03 {hour:02}:40:00"), rule(&[Period::Hourly])));
        }
        want.push(("2026-03-03 23:40:00".to_string(), rule(&[Period::Hourly, Period::Daily])));
        for hour in 0..=8 {
            want.push((format!("2026-03-04 {hour:02}:40:00"), rule(&[Period::Hourly])));
        }
        want.push(("2026-03-04 09:40:00".to_string(), KeepReason::Newest));
        assert_eq!(kept(&decisions), want);
        assert_eq!(want.len(), 26);
    }

    #[test]
    fn keep_last_only() {
        let ids = sessions(&[
            "2026-01-01 00:00:00",
            "2026-01-01 00:00:01",
            "2026-01-01 00:00:02",
            "2026-05-01 00:00:00",
            "2027-01-01 00:00:00",
        ]);
        let decisions = decide_untagged(&ids, &KeepRules { last: 2, ..KeepRules::default() }).expect("decide");
        assert_eq!(
            kept(&decisions),
            [
                ("2026-05-01 00:00:00".to_string(), rule(&[Period::Last])),
                ("2027-01-01 00:00:00".to_string(), KeepReason::Newest),
            ]
        );
        // More than there are: everything stays.
        let decisions = decide_untagged(&ids, &KeepRules { last: 10, ..KeepRules::default() }).expect("decide");
        assert!(decisions.iter().all(Decision::is_kept));
        assert_eq!(decisions[0].keep, Some(rule(&[Period::Last])));
    }

    #[test]
    fn weekly_uses_iso_weeks_across_the_year_boundary() {
        // 2020-12-31 (Thu) and 2021-01-03 (Sun) are both in ISO week 2020-W53;
        // 2021-01-04 (Mon) starts 2021-W01.
        let iso = |s: &str| {
            let w = time(s).date().iso_week();
            (w.year(), w.week())
        };
        assert_eq!(iso("2020-12-31 12:00:00"), (2020, 53));
        assert_eq!(iso("2021-01-03 12:00:00"), (2020, 53));
        assert_eq!(iso("2021-01-04 12:00:00"), (2021, 1));

        let ids = sessions(&[
            "2020-12-24 12:00:00", // 2020-W52
            "2020-12-31 12:00:00", // 2020-W53
            "2021-01-03 12:00:00", // 2020-W53, newest of that week
            "2021-01-04 12:00:00", // 2021-W01
            "2021-01-05 12:00:00", // 2021-W01, newest
        ]);
        let decisions = decide_untagged(&ids, &KeepRules { weekly: 3, ..KeepRules::default() }).expect("decide");
        assert_eq!(
            kept(&decisions),
            [
                ("2020-12-24 12:00:00".to_string(), rule(&[Period::Weekly])),
                ("2021-01-03 12:00:00".to_string(), rule(&[Period::Weekly])),
                ("2021-01-05 12:00:00".to_string(), KeepReason::Newest),
            ]
        );
        // Years are calendar years: 2020 ends with 12-31.
        let decisions = decide_untagged(&ids, &KeepRules { yearly: 2, ..KeepRules::default() }).expect("decide");
        assert_eq!(
            kept(&decisions),
            [
                ("2020-12-31 12:00:00".to_string(), rule(&[Period::Yearly])),
                ("2021-01-05 12:00:00".to_string(), KeepReason::Newest),
            ]
        );
    }

    #[test]
    fn monthly_and_yearly_count_only_periods_with_sessions() {
        let ids = sessions(&[
            "2023-05-10 08:00:00",
            "2023-11-02 08:00:00",
            "2023-11-20 08:00:00", // newest of 2023
            "2024-01-15 08:00:00", // newest of January; February has none
            "2024-03-01 08:00:00",
            "2024-03-31 23:59:59", // newest of March
            "2024-04-01 00:00:00", // newest
        ]);
        let rules = KeepRules { monthly: 3, yearly: 2, ..KeepRules::default() };
        let decisions = decide_untagged(&ids, &rules).expect("decide");
        assert_eq!(
            kept(&decisions),
            [
                ("2023-11-20 08:00:00".to_string(), rule(&[Period::Yearly])),
                ("2024-01-15 08:00:00".to_string(), rule(&[Period::Monthly])),
                ("2024-03-31 23:59:59".to_string(), rule(&[Period::Monthly])),
                ("2024-04-01 00:00:00".to_string(), KeepReason::Newest),
            ]
        );
    }

    #[test]
    fn tags_protect_an_old_session() {
        let ids = sessions(&[
            "2025-06-01 00:00:00",
            "2025-06-02 00:00:00",
            "2025-06-03 00:00:00",
            "2025-06-04 00:00:00",
            "2025-06-05 00:00:00",
        ]);
        let tag_lists = [tags(&["before-upgrade"]), vec![], vec![], tags(&["a", "b"]), tags(&["on-newest"])];
        let candidates: Vec<Candidate> =
            ids.iter().zip(&tag_lists).map(|(session, tags)| Candidate { session, tags }).collect();
        let decisions = decide(&candidates, &KeepRules { last: 2, ..KeepRules::default() }).expect("decide");
        assert_eq!(
            kept(&decisions),
            [
                ("2025-06-01 00:00:00".to_string(), KeepReason::Tagged(tags(&["before-upgrade"]))),
                // Also kept by last = 2, but the tags are what is shown.
                ("2025-06-04 00:00:00".to_string(), KeepReason::Tagged(tags(&["a", "b"]))),
                // Newest wins over tags.
                ("2025-06-05 00:00:00".to_string(), KeepReason::Newest),
            ]
        );
    }

    #[test]
    fn newest_is_always_kept_as_newest() {
        let ids = sessions(&["2020-01-01 00:00:00", "2024-07-01 00:00:00", "2024-07-01 00:30:00"]);
        for period in Period::ALL {
            let mut rules = KeepRules::default();
            match period {
                Period::Last => rules.last = 1,
                Period::Hourly => rules.hourly = 1,
                Period::Daily => rules.daily = 1,
                Period::Weekly => rules.weekly = 1,
                Period::Monthly => rules.monthly = 1,
                Period::Yearly => rules.yearly = 1,
            }
            assert_eq!(period.count_in(&rules), 1);
            let decisions = decide_untagged(&ids, &rules).expect("decide");
            let reasons: Vec<Option<KeepReason>> = decisions.into_iter().map(|d| d.keep).collect();
            assert_eq!(reasons, [None, None, Some(KeepReason::Newest)], "{period}");
        }
    }

    #[test]
    fn empty_rules_are_refused() {
        let ids = sessions(&["2020-01-01 00:00:00", "2020-01-02 00:00:00"]);
        assert!(KeepRules::default().is_empty());
        let err = decide_untagged(&ids, &KeepRules::default()).expect_err("no rule").to_string();
        assert!(err.contains("no keep rule given"), "{err}");
        // Even without sessions: a missing rule is a caller's mistake.
        assert!(decide(&[], &KeepRules::default()).is_err());
        assert!(!KeepRules { yearly: 1, ..KeepRules::default() }.is_empty());
    }

    #[test]
    fn unsorted_or_repeated_input_is_refused() {
        let rules = KeepRules { last: 5, ..KeepRules::default() };
        let ids = sessions(&["2020-01-02 00:00:00", "2020-01-01 00:00:00"]);
        let err = decide_untagged(&ids, &rules).expect_err("unsorted").to_string();
        assert!(err.contains("oldest first") && err.contains("S_20200102-000000"), "{err}");
        let ids = sessions(&["2020-01-01 00:00:00", "2020-01-01 00:00:00"]);
        assert!(decide_untagged(&ids, &rules).is_err(), "repeated");
    }

    #[test]
    fn single_session_and_no_sessions() {
        let ids = sessions(&["2020-01-01 00:00:00"]);
        let decisions = decide_untagged(&ids, &KeepRules { daily: 1, ..KeepRules::default() }).expect("decide");
        assert_eq!(decisions, [Decision { session: ids[0].clone(), keep: Some(KeepReason::Newest) }]);
        assert!(decide(&[], &KeepRules { daily: 1, ..KeepRules::default() }).expect("decide").is_empty());
    }

    /// The reference model: written differently from `decide` on purpose.
    /// Each period is a formatted label that sorts chronologically; a
    /// BTreeMap gives the newest session of every period, and the last N
    /// entries are the N most recent periods.
    fn reference(history: &[(NaiveDateTime, Vec<String>)], rules: &KeepRules) -> Vec<Option<KeepReason>> {
        let mut periods_keeping: Vec<Vec<Period>> = vec![Vec::new(); history.len()];
        for period in Period::ALL {
            let mut newest_in: BTreeMap<String, usize> = BTreeMap::new();
            for (index, (t, _)) in history.iter().enumerate() {
                let label = match period {
                    Period::Last => format!("{index:08}"),
                    Period::Hourly => t.format("%Y-%m-%d %H").to_string(),
                    Period::Daily => t.format("%Y-%m-%d").to_string(),
                    Period::Weekly => t.format("%G-W%V").to_string(),
                    Period::Monthly => t.format("%Y-%m").to_string(),
                    Period::Yearly => t.format("%Y").to_string(),
                };
                let newest = newest_in.entry(label).or_insert(index);
                *newest = (*newest).max(index);
            }
            for &index in newest_in.values().rev().take(period.count_in(rules) as usize) {
                periods_keeping[index].push(period);
            }
        }
        let last = history.len().checked_sub(1);
        history
            .iter()
            .zip(periods_keeping)
            .enumerate()
            .map(|(index, ((_, tags), periods))| match () {
                _ if Some(index) == last => Some(KeepReason::Newest),
                _ if !tags.is_empty() => Some(KeepReason::Tagged(tags.clone())),
                _ if !periods.is_empty() => Some(KeepReason::Rule(periods)),
                _ => None,
            })
            .collect()
    }

    /// Sessions at strictly increasing times over a few years (gaps from
    /// seconds to months, so that every kind of period sees both crowded and
    /// empty stretches), about one in ten tagged.
    fn arb_history() -> impl Strategy<Value = Vec<(NaiveDateTime, Vec<String>)>> {
        let gap = prop_oneof![
            3 => 1i64..1200,
            3 => 1200i64..4 * 3600,
            3 => 4 * 3600i64..3 * 86400,
            2 => 86400i64..40 * 86400,
            1 => 40 * 86400i64..400 * 86400,
        ];
        let tags = prop_oneof![9 => Just(Vec::new()), 1 => proptest::collection::vec("[a-z]{1,5}", 1..3)];
        // Starting anywhere from late 2018 to late 2022 crosses ISO-week
        // year boundaries such as 2020-W53.
        (0i64..4 * 365 * 86400, proptest::collection::vec((gap, tags), 0..60)).prop_map(|(offset, steps)| {
            let mut t = time("2018-12-20 00:00:00") + TimeDelta::seconds(offset);
            steps
                .into_iter()
                .map(|(gap, tags)| {
                    t += TimeDelta::seconds(gap);
                    (t, tags)
                })
                .collect()
        })
    }

    fn arb_rules() -> impl Strategy<Value = KeepRules> {
        let count = || prop_oneof![3 => Just(0u32), 3 => 1u32..4, 1 => 4u32..40];
        (count(), count(), count(), count(), count(), count()).prop_map(
            |(last, hourly, daily, weekly, monthly, yearly)| KeepRules { last, hourly, daily, weekly, monthly, yearly },
        )
    }

    fn decide_history(history: &[(NaiveDateTime, Vec<String>)], rules: &KeepRules) -> Vec<Decision> {
        let ids: Vec<SessionId> = history.iter().map(|(t, _)| session_at(*t)).collect();
        let candidates: Vec<Candidate> =
            ids.iter().zip(history).map(|(session, (_, tags))| Candidate { session, tags }).collect();
        decide(&candidates, rules).expect("decide")
    }

    /// The sessions `decisions` keeps, with their tags.
    fn survivors(
        history: &[(NaiveDateTime, Vec<String>)],
        decisions: &[Decision],
    ) -> Vec<(NaiveDateTime, Vec<String>)> {
        history.iter().zip(decisions).filter(|(_, d)| d.is_kept()).map(|(h, _)| h.clone()).collect()
    }

    proptest! {
        /// `decide` agrees with the reference model, session by session and
        /// reason by reason, and keeps what it must.
        #[test]
        fn decide_matches_reference(history in arb_history(), rules in arb_rules()) {
            prop_assume!(!rules.is_empty());
            let decisions = decide_history(&history, &rules);
            prop_assert_eq!(decisions.len(), history.len());
            for (decision, (t, _)) in decisions.iter().zip(&history) {
                prop_assert_eq!(&decision.session, &session_at(*t));
            }
            let got: Vec<Option<KeepReason>> = decisions.iter().map(|d| d.keep.clone()).collect();
            prop_assert_eq!(&got, &reference(&history, &rules));
            if let Some(newest) = decisions.last() {
                prop_assert_eq!(&newest.keep, &Some(KeepReason::Newest));
            }
            for (decision, (_, tags)) in decisions.iter().zip(&history) {
                prop_assert!(tags.is_empty() || decision.is_kept());
                if let Some(KeepReason::Rule(periods)) = &decision.keep {
                    prop_assert!(!periods.is_empty());
                }
            }
        }

        /// Running the rules again on what they kept keeps all of it, for the
        /// same reasons. This holds in general, tags and `last` included: the
        /// N most recent periods of a rule all keep their newest session, so
        /// they are still the N most recent periods among the survivors (no
        /// newer period can appear), with the same newest sessions.
        #[test]
        fn decide_is_idempotent(history in arb_history(), rules in arb_rules()) {
            prop_assume!(!rules.is_empty());
            let first = decide_history(&history, &rules);
            let kept = survivors(&history, &first);
            let second = decide_history(&kept, &rules);
            let first_kept: Vec<Decision> = first.into_iter().filter(Decision::is_kept).collect();
            prop_assert_eq!(second, first_kept);
        }

        /// Pruning after every new session ends with the same sessions, for
        /// the same reasons, as pruning once over the whole history: a
        /// session the final rules keep was the newest of its period, in a
        /// period recent enough, at every earlier prune too.
        #[test]
        fn pruning_as_you_go_matches_pruning_once(history in arb_history(), rules in arb_rules()) {
            prop_assume!(!rules.is_empty());
            let mut current: Vec<(NaiveDateTime, Vec<String>)> = Vec::new();
            let mut last_decisions = Vec::new();
            for entry in &history {
                current.push(entry.clone());
                last_decisions = decide_history(&current, &rules);
                current = survivors(&current, &last_decisions);
            }
            let as_you_go: Vec<Decision> = last_decisions.into_iter().filter(Decision::is_kept).collect();
            let once: Vec<Decision> = decide_history(&history, &rules).into_iter().filter(Decision::is_kept).collect();
            prop_assert_eq!(as_you_go, once);
        }
    }
}
