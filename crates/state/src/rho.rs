//! Fixed-point zCDP budget amounts (nano-rho) with exact, directed rounding from `f64`.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::StateError;

/// A zero-concentrated-DP budget amount `rho` (Bun & Steinke 2016) in fixed point: an integer
/// number of nano-rho (`1 rho = 10^9` units).
///
/// Ledgers add and compare `Rho`s exactly, so spending never drifts with floating-point
/// error. Conversions from `f64` are exact and directed: a charge is rounded **up**
/// ([`Rho::from_f64_ceil`]) and a cap is rounded **down** ([`Rho::from_f64_floor`]), so the
/// ledger never under-counts. Note that a decimal such as `0.1` is stored in `f64` as a
/// value slightly above it, so `Rho::from_f64_ceil(0.1)` is `0.100000001`; compute charges in
/// nano-rho ([`Rho::from_nano`]) when exact decimal multiples matter.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Rho(u64);

impl Rho {
    /// No budget.
    pub const ZERO: Rho = Rho(0);
    /// Fixed-point units per unit of rho.
    pub const UNITS_PER_RHO: u64 = 1_000_000_000;
    /// The largest representable amount (about 1.8e10 rho).
    pub const MAX: Rho = Rho(u64::MAX);

    /// An amount of `nano` nano-rho.
    pub const fn from_nano(nano: u64) -> Self {
        Rho(nano)
    }

    /// The amount in nano-rho.
    pub const fn as_nano(self) -> u64 {
        self.0
    }

    /// The smallest fixed-point amount that is at least `rho` (use for charges).
    ///
    /// Fails for negative, NaN, infinite or too large values.
    pub fn from_f64_ceil(rho: f64) -> Result<Self, StateError> {
        to_fixed(rho, Rounding::Up).map(Rho)
    }

    /// The largest fixed-point amount that is at most `rho` (use for caps).
    ///
    /// Fails for negative, NaN, infinite or too large values.
    pub fn from_f64_floor(rho: f64) -> Result<Self, StateError> {
        to_fixed(rho, Rounding::Down).map(Rho)
    }

    /// The amount as a float (for reports; may round in the last bit).
    pub fn to_f64(self) -> f64 {
        let whole = (self.0 / Self::UNITS_PER_RHO) as f64;
        let fraction = (self.0 % Self::UNITS_PER_RHO) as f64 / Self::UNITS_PER_RHO as f64;
        whole + fraction
    }

    /// `self + other`, or `None` on overflow.
    pub fn checked_add(self, other: Rho) -> Option<Rho> {
        self.0.checked_add(other.0).map(Rho)
    }

    /// `self + other`, or [`Rho::MAX`] on overflow.
    pub fn saturating_add(self, other: Rho) -> Rho {
        Rho(self.0.saturating_add(other.0))
    }

    /// `self - other`, or zero when `other` is larger.
    pub fn saturating_sub(self, other: Rho) -> Rho {
        Rho(self.0.saturating_sub(other.0))
    }
}

impl fmt::Display for Rho {
    /// Exact decimal, e.g. `0.250000000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:09}",
            self.0 / Self::UNITS_PER_RHO,
            self.0 % Self::UNITS_PER_RHO
        )
    }
}

/// Direction of rounding to fixed point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rounding {
    Up,
    Down,
}

/// `rho * 10^9` rounded in the given direction, computed exactly from the bits of `rho`.
fn to_fixed(rho: f64, rounding: Rounding) -> Result<u64, StateError> {
    let invalid = |reason: &str| StateError::InvalidArgument {
        field: "rho",
        reason: format!("{rho}: {reason}"),
    };
    if rho.is_nan() || rho.is_infinite() {
        return Err(invalid("must be finite"));
    }
    if rho.is_sign_negative() && rho != 0.0 {
        return Err(invalid("must be non-negative"));
    }
    if rho == 0.0 {
        return Ok(0);
    }
    // rho = mantissa * 2^exponent exactly.
    let bits = rho.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i32;
    let fraction = bits & ((1_u64 << 52) - 1);
    let (mantissa, exponent) = if biased == 0 {
        (fraction, -1074)
    } else {
        (fraction | (1_u64 << 52), biased - 1075)
    };
    // mantissa < 2^53 and 10^9 < 2^30: the product fits in 83 bits.
    let product = u128::from(mantissa) * u128::from(Rho::UNITS_PER_RHO);
    let too_large = || invalid("exceeds the largest representable budget");
    let scaled: u128 = if exponent >= 0 {
        // product < 2^83, so any shift above 44 overflows u128's useful range for u64 anyway.
        if exponent > 44 {
            return Err(too_large());
        }
        product << exponent
    } else {
        let shift = exponent.unsigned_abs();
        if shift >= 100 {
            // product < 2^83 < 2^shift: the value is in (0, 1) units.
            match rounding {
                Rounding::Up => 1,
                Rounding::Down => 0,
            }
        } else {
            let floor = product >> shift;
            let exact = floor << shift == product;
            match rounding {
                Rounding::Down => floor,
                Rounding::Up if exact => floor,
                Rounding::Up => floor + 1,
            }
        }
    };
    u64::try_from(scaled).map_err(|_| too_large())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_binary_fractions_convert_exactly_both_ways() {
        assert_eq!(
            Rho::from_f64_ceil(0.5).unwrap(),
            Rho::from_nano(500_000_000)
        );
        assert_eq!(
            Rho::from_f64_floor(0.5).unwrap(),
            Rho::from_nano(500_000_000)
        );
        assert_eq!(
            Rho::from_f64_ceil(3.0).unwrap(),
            Rho::from_nano(3_000_000_000)
        );
        assert_eq!(Rho::from_f64_ceil(0.0).unwrap(), Rho::ZERO);
        assert_eq!(Rho::from_f64_ceil(-0.0).unwrap(), Rho::ZERO);
    }

    #[test]
    fn decimal_fractions_round_up_for_charges_and_down_for_caps() {
        // f64 0.1 is 0.1000000000000000055511151231257827...
        assert_eq!(
            Rho::from_f64_ceil(0.1).unwrap(),
            Rho::from_nano(100_000_001)
        );
        assert_eq!(
            Rho::from_f64_floor(0.1).unwrap(),
            Rho::from_nano(100_000_000)
        );
        // f64 0.3 is 0.299999999999999988897769753748434595...
        assert_eq!(
            Rho::from_f64_ceil(0.3).unwrap(),
            Rho::from_nano(300_000_000)
        );
        assert_eq!(
            Rho::from_f64_floor(0.3).unwrap(),
            Rho::from_nano(299_999_999)
        );
    }

    #[test]
    fn tiny_values_round_up_to_one_unit_and_down_to_zero() {
        for tiny in [f64::MIN_POSITIVE, 5e-324, 1e-12, 4e-10] {
            assert_eq!(
                Rho::from_f64_ceil(tiny).unwrap(),
                Rho::from_nano(1),
                "{tiny}"
            );
            assert_eq!(Rho::from_f64_floor(tiny).unwrap(), Rho::ZERO, "{tiny}");
        }
    }

    #[test]
    fn rounding_brackets_the_true_value_for_many_inputs() {
        // Compare against exact rational arithmetic: ceil/floor of m * 10^9 / 2^s.
        let mut value = 1.0e-7_f64;
        while value < 1.0e6 {
            let up = Rho::from_f64_ceil(value).unwrap().as_nano();
            let down = Rho::from_f64_floor(value).unwrap().as_nano();
            assert!(up == down || up == down + 1, "{value}: {down}..{up}");
            // The bracket contains the value (checked in f64 with a relative margin that is
            // far below one unit for these magnitudes).
            let units = value * 1e9;
            assert!((down as f64) <= units * (1.0 + 1e-15) + 1e-9, "{value}");
            assert!((up as f64) >= units * (1.0 - 1e-15) - 1e-9, "{value}");
            value *= 1.37;
        }
    }

    #[test]
    fn invalid_values_are_refused_with_the_field_name() {
        for bad in [f64::NAN, f64::INFINITY, -1.0, 1e300, 2e10] {
            let error = Rho::from_f64_ceil(bad).unwrap_err();
            assert!(
                matches!(error, StateError::InvalidArgument { field: "rho", .. }),
                "{bad}: {error}"
            );
        }
        assert!(Rho::from_f64_floor(1.8e10).is_ok());
    }

    #[test]
    fn display_is_exact_decimal_and_to_f64_matches() {
        let amount = Rho::from_nano(1_250_000_007);
        assert_eq!(amount.to_string(), "1.250000007");
        assert!((amount.to_f64() - 1.250000007).abs() < 1e-15);
        assert_eq!(
            Rho::from_nano(5).saturating_sub(Rho::from_nano(7)),
            Rho::ZERO
        );
        assert_eq!(Rho::MAX.checked_add(Rho::from_nano(1)), None);
    }
}
