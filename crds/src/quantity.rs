//! Comparing Kubernetes resource quantities (`1Gi`, `500M`, `1.5Gi`, `1e9`), which volume
//! expansion needs: the operator compares `spec.storage.size` with the members' claims, and
//! the test cluster's provisioner a claim's request with its volume's capacity. k8s-openapi keeps
//! a `Quantity` as its string, so the comparison parses the canonical grammar of
//! apimachinery's `resource.Quantity` into thousandths of a unit (storage is never fractional
//! below that, and 'm' is the smallest suffix).

use std::cmp::Ordering;

/// The value of `quantity` in thousandths of a unit, rounded up; None when it is not a
/// quantity or does not fit.
pub fn milli_units(quantity: &str) -> Option<u128> {
    let text = quantity.trim();
    let text = text.strip_prefix('+').unwrap_or(text);
    let number_end = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return None;
    }
    let digits = format!("{whole}{fraction}");
    // 38 digits always fit u128; longer mantissas are not realistic quantities.
    if digits.len() > 38 {
        return None;
    }
    let mantissa: u128 = digits.parse().ok()?;
    let (numerator, denominator) = multiplier(suffix)?;
    let denominator = denominator.checked_mul(10u128.checked_pow(u32::try_from(fraction.len()).ok()?)?)?;
    let scaled = mantissa.checked_mul(numerator)?.checked_mul(1000)?;
    Some(scaled.div_ceil(denominator))
}

/// The suffix as a fraction numerator/denominator.
fn multiplier(suffix: &str) -> Option<(u128, u128)> {
    let binary = |power: u32| Some((1u128 << power, 1));
    let decimal = |power: u32| Some((10u128.pow(power), 1));
    match suffix {
        "" => decimal(0),
        "m" => Some((1, 1000)),
        "k" => decimal(3),
        "M" => decimal(6),
        "G" => decimal(9),
        "T" => decimal(12),
        "P" => decimal(15),
        "E" => decimal(18),
        "Ki" => binary(10),
        "Mi" => binary(20),
        "Gi" => binary(30),
        "Ti" => binary(40),
        "Pi" => binary(50),
        "Ei" => binary(60),
        _ => {
            // Decimal exponent form: 1e3, 5E-3 ('E' alone is exa, matched above).
            let exponent = suffix.strip_prefix(['e', 'E'])?;
            let (negative, digits) = match exponent.as_bytes().first()? {
                b'-' => (true, &exponent[1..]),
                b'+' => (false, &exponent[1..]),
                _ => (false, exponent),
            };
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let power = 10u128.checked_pow(digits.parse().ok()?)?;
            Some(if negative { (1, power) } else { (power, 1) })
        }
    }
}

/// Orders two quantities by value; None when either does not parse.
pub fn compare(a: &str, b: &str) -> Option<Ordering> {
    Some(milli_units(a)?.cmp(&milli_units(b)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_and_decimal_suffixes() {
        assert_eq!(milli_units("1Gi"), Some(1000 * (1 << 30)));
        assert_eq!(milli_units("1G"), Some(1000 * 1_000_000_000));
        assert_eq!(milli_units("512Mi"), Some(1000 * 512 * (1 << 20)));
        assert_eq!(milli_units("100"), Some(100_000));
        assert_eq!(milli_units("250m"), Some(250));
        assert_eq!(milli_units("2E"), Some(2 * 10u128.pow(21)));
    }

    #[test]
    fn fractions_and_exponents() {
        assert_eq!(milli_units("1.5Gi"), Some(1000 * 3 * (1 << 29)));
        assert_eq!(milli_units("1e3"), Some(1_000_000));
        assert_eq!(milli_units("5e-3"), Some(5));
        assert_eq!(milli_units(".5k"), Some(500_000));
        // Rounded up, as apimachinery rounds a quantity below its precision.
        assert_eq!(milli_units("0.0001"), Some(1));
    }

    #[test]
    fn rejects_what_is_not_a_quantity() {
        for bad in ["", "Gi", "1.2.3", "1Xi", "1e", "1e+", "abc", "-1Gi", "1 Gi"] {
            assert_eq!(milli_units(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn compares_across_notations() {
        assert_eq!(compare("1Gi", "1024Mi"), Some(Ordering::Equal));
        assert_eq!(compare("1G", "1Gi"), Some(Ordering::Less));
        assert_eq!(compare("2Gi", "1.5Gi"), Some(Ordering::Greater));
        assert_eq!(compare("1Gi", "nonsense"), None);
    }
}
