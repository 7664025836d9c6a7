//! Failpoints, for tests that make a member crash, stall or fail at a chosen place (etcd's
//! gofail, in small). `CONSENSUS_NODE_FAILPOINTS` lists `name=action` pairs, comma-separated;
//! an action is `exit` (the process ends at once, as a crash would: nothing more is written),
//! `sleep(MS)` (the thread waits MS milliseconds, a slow disk) or `error` (the operation fails
//! with an I/O error, a failing disk). Unset, every point costs one lookup in an empty list.
//!
//! Points: `identity-saved` (a founder's identity is on disk, Raft not yet initialized),
//! `wal-fsync` (before each `fdatasync` of the write-ahead log), `read-index` (before a
//! linearizable read confirms leadership; `error` there skips the confirmation, a bug planted
//! for the chaos checker's own test: reads served from local state), `delete-step-committed`
//! (after each durable step of a large DeleteRange but its last).

use std::sync::OnceLock;
use std::time::Duration;

/// Exit status of a member ended by an `exit` failpoint, distinct from any error exit.
pub const FAILPOINT_EXIT: i32 = 86;
pub const FAILPOINTS_ENV: &str = "CONSENSUS_NODE_FAILPOINTS";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Exit,
    Sleep(Duration),
    Error,
}

fn points() -> &'static [(String, Action)] {
    static POINTS: OnceLock<Vec<(String, Action)>> = OnceLock::new();
    POINTS.get_or_init(|| match parse(&std::env::var(FAILPOINTS_ENV).unwrap_or_default()) {
        Ok(points) => points,
        // A test that asks for a failpoint it spelled wrong must not pass without it.
        Err(e) => {
            eprintln!("{FAILPOINTS_ENV}: {e}");
            std::process::exit(2);
        }
    })
}

fn parse(value: &str) -> Result<Vec<(String, Action)>, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, action) =
                pair.split_once('=').ok_or_else(|| format!("{pair:?} is not name=action"))?;
            let action = match action.trim() {
                "exit" => Action::Exit,
                "error" => Action::Error,
                other => {
                    let ms = other
                        .strip_prefix("sleep(")
                        .and_then(|rest| rest.strip_suffix(')'))
                        .and_then(|ms| ms.parse().ok())
                        .ok_or_else(|| format!("{other:?} is not exit, error or sleep(MS)"))?;
                    Action::Sleep(Duration::from_millis(ms))
                }
            };
            Ok((name.trim().to_owned(), action))
        })
        .collect()
}

/// Carries out the action of failpoint `name`, if one is set: exits, sleeps, or returns the
/// error the caller then fails with.
pub fn eval(name: &str) -> std::io::Result<()> {
    let Some((_, action)) = points().iter().find(|(point, _)| point == name) else { return Ok(()) };
    match action {
        Action::Exit => {
            eprintln!("{FAILPOINTS_ENV}: exiting at {name}");
            std::process::exit(FAILPOINT_EXIT);
        }
        Action::Sleep(pause) => std::thread::sleep(*pause),
        Action::Error => return Err(std::io::Error::other(format!("failpoint {name}"))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failpoints_are_name_action_pairs() {
        assert_eq!(
            parse(" wal-fsync=sleep(250), identity-saved=exit,,x=error").expect("parses"),
            [
                ("wal-fsync".to_owned(), Action::Sleep(Duration::from_millis(250))),
                ("identity-saved".to_owned(), Action::Exit),
                ("x".to_owned(), Action::Error),
            ]
        );
        assert!(parse("wal-fsync").is_err());
        assert!(parse("wal-fsync=slow").is_err());
    }
}
