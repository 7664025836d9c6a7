use std::time::Duration;

/// A duration written the way Kubernetes users write them (Go's `time.ParseDuration`
/// subset without signs): one or more `<number><unit>` pairs, units `ms`, `s`, `m`, `h`, `d`.
/// `d` is accepted because retention is naturally said in days.
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h|d))+$";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("duration {0:?} is empty")]
    Empty(String),
    #[error("duration {input:?}: {reason}; write it like 30s, 5m, 1h30m or 7d")]
    Invalid { input: String, reason: &'static str },
}

/// Parses durations such as `90s`, `5m`, `1h30m`, `7d`.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    if input.is_empty() {
        return Err(DurationError::Empty(input.to_owned()));
    }
    let invalid = |reason| DurationError::Invalid { input: input.to_owned(), reason };
    let mut total = Duration::ZERO;
    let mut rest = input;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(invalid("expected a number"));
        }
        let value: u64 = rest[..digits].parse().map_err(|_| invalid("number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            "" => return Err(invalid("missing unit")),
            _ => return Err(invalid("unknown unit")),
        };
        rest = &rest[unit_len..];
        let part = unit
            .checked_mul(u32::try_from(value).map_err(|_| invalid("number too large"))?)
            .ok_or_else(|| invalid("number too large"))?;
        total = total.checked_add(part).ok_or_else(|| invalid("number too large"))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_and_compound_durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    }

    #[test]
    fn rejects_malformed_durations_with_the_reason() {
        assert_eq!(parse_duration(""), Err(DurationError::Empty(String::new())));
        for bad in ["5", "m", "5x", "-5m", "1.5h", "5 m", "99999999999h"] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn pattern_and_parser_agree() {
        let pattern = regex::Regex::new(DURATION_PATTERN).expect("valid pattern");
        for input in ["90s", "1h30m", "7d", "250ms", "5", "m", "5x", "1.5h", "", "-5m"] {
            assert_eq!(
                pattern.is_match(input),
                parse_duration(input).is_ok(),
                "pattern and parser disagree on {input:?}"
            );
        }
    }
}
