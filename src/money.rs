//! Exact money: integer pico-USD, parsed from decimal text, never through a float.
//!
//! SPEC §4: the `cost` reported for a request equals the amount debited, to the unit.
//! [`Money`] is an `i64` count of pico-USD (10⁻¹² USD, enough for ±9.2 million USD);
//! [`Price`] is pico-USD per token, which is exactly a config price of USD per million
//! tokens with up to six decimal places.
//!
//! # Example
//! ```
//! use switchboard::money::{Money, Price};
//!
//! let prompt: Price = "0.15".parse().unwrap(); // USD per 1M tokens
//! let cost = prompt.times(1_000);
//! assert_eq!(cost, Money::from_pico(150_000_000));
//! assert_eq!(cost.to_string(), "0.00015");
//! assert_eq!("5".parse::<Money>().unwrap().pico(), 5_000_000_000_000);
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Pico-USD per USD.
pub const PICO_PER_USD: i64 = 1_000_000_000_000;

/// An amount of money in integer pico-USD. Serialises as a JSON number in USD,
/// written from its exact decimal digits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(i64);

impl Money {
    /// Nothing.
    pub const ZERO: Money = Money(0);

    /// From a count of pico-USD.
    pub const fn from_pico(pico: i64) -> Self {
        Money(pico)
    }

    /// The count of pico-USD.
    pub const fn pico(self) -> i64 {
        self.0
    }

    /// Adds, saturating at the bounds (an overflow here is a bug or an absurd amount).
    pub fn saturating_add(self, other: Money) -> Money {
        Money(self.0.saturating_add(other.0))
    }

    /// Subtracts, saturating at the bounds.
    pub fn saturating_sub(self, other: Money) -> Money {
        Money(self.0.saturating_sub(other.0))
    }

    /// Whether the amount is negative.
    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// The amount in USD as a float, for display and metrics only.
    pub fn as_usd_f64(self) -> f64 {
        self.0 as f64 / PICO_PER_USD as f64
    }
}

impl std::ops::Add for Money {
    type Output = Money;
    fn add(self, rhs: Money) -> Money {
        self.saturating_add(rhs)
    }
}

impl std::ops::Sub for Money {
    type Output = Money;
    fn sub(self, rhs: Money) -> Money {
        self.saturating_sub(rhs)
    }
}

impl std::iter::Sum for Money {
    fn sum<I: Iterator<Item = Money>>(iter: I) -> Money {
        iter.fold(Money::ZERO, |a, b| a + b)
    }
}

impl fmt::Display for Money {
    /// USD with as many decimals as needed and no trailing zeros: `0.00015`, `5`, `-1.5`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; Money::TEXT_MAX];
        f.write_str(self.text(&mut buf))
    }
}

impl Money {
    /// The longest [`Money::text`]: a sign, 7 whole digits, a point and 12 decimals.
    pub(crate) const TEXT_MAX: usize = 21;

    /// The decimal text `Display` writes, in `buf`: no allocation and no formatting
    /// machinery (it runs in every response that reports a cost).
    pub(crate) fn text(self, buf: &mut [u8; Money::TEXT_MAX]) -> &str {
        let abs = self.0.unsigned_abs();
        let (mut whole, mut frac) = (abs / PICO_PER_USD as u64, abs % PICO_PER_USD as u64);
        // Written backwards from the end: the fraction without trailing zeros, the
        // point, the whole digits, the sign.
        let mut at = buf.len();
        let mut fraction_digits = 12;
        while frac != 0 && frac % 10 == 0 {
            frac /= 10;
            fraction_digits -= 1;
        }
        if frac != 0 {
            for _ in 0..fraction_digits {
                at -= 1;
                buf[at] = b'0' + (frac % 10) as u8;
                frac /= 10;
            }
            at -= 1;
            buf[at] = b'.';
        }
        loop {
            at -= 1;
            buf[at] = b'0' + (whole % 10) as u8;
            whole /= 10;
            if whole == 0 {
                break;
            }
        }
        if self.0 < 0 {
            at -= 1;
            buf[at] = b'-';
        }
        // ASCII digits, a point and a sign.
        std::str::from_utf8(&buf[at..]).unwrap_or_default()
    }
}

/// Why a decimal amount was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseMoneyError {
    /// Not a plain decimal number.
    #[error("`{0}` is not a decimal number (write e.g. 0.15)")]
    NotDecimal(String),
    /// More decimal places than the unit can hold.
    #[error("`{0}` has more than {1} decimal places")]
    TooPrecise(String, usize),
    /// Too large, or negative where it must not be.
    #[error("`{0}` is out of range")]
    OutOfRange(String),
}

/// Parses `[-]digits[.digits]` into an integer scaled by 10^`places`.
fn parse_scaled(text: &str, places: usize) -> Result<i64, ParseMoneyError> {
    let t = text.trim();
    let (neg, body) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (whole, frac) = body.split_once('.').unwrap_or((body, ""));
    let is_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !is_digits(whole) || !is_digits(frac) {
        return Err(ParseMoneyError::NotDecimal(text.into()));
    }
    let frac = frac.trim_end_matches('0');
    if frac.len() > places {
        return Err(ParseMoneyError::TooPrecise(text.into(), places));
    }
    let out_of_range = || ParseMoneyError::OutOfRange(text.into());
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| out_of_range())?
    };
    let mut frac_val: i64 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| out_of_range())?
    };
    for _ in frac.len()..places {
        frac_val *= 10;
    }
    let scale = 10i64.pow(places as u32);
    let v = whole
        .checked_mul(scale)
        .and_then(|w| w.checked_add(frac_val))
        .ok_or_else(out_of_range)?;
    Ok(if neg { -v } else { v })
}

impl FromStr for Money {
    type Err = ParseMoneyError;
    /// Parses USD from decimal text with up to 12 decimal places.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_scaled(s, 12).map(Money)
    }
}

impl Serialize for Money {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // The exact decimal digits, as a JSON number (not a string, not a float).
        // (The chat responses' own writers, `chat/ser.rs`, skip the `RawValue`'s
        // re-parse of the text.)
        let mut buf = [0u8; Money::TEXT_MAX];
        let raw = serde_json::value::RawValue::from_string(self.text(&mut buf).to_owned())
            .map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        decimal_text(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Reads a number or a string as decimal text. A number that arrives as a float is
/// written back with Rust's shortest round-trip formatting, which restores the
/// original text for any decimal of up to 15 significant digits.
fn decimal_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Num {
        Int(i64),
        Float(f64),
        Text(String),
    }
    Ok(match Num::deserialize(d)? {
        Num::Int(i) => i.to_string(),
        Num::Float(f) => format!("{f}"),
        Num::Text(s) => s,
    })
}

/// A price in pico-USD per token, i.e. USD per million tokens × 10⁶.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Price(i64);

impl Price {
    /// Free.
    pub const ZERO: Price = Price(0);

    /// From pico-USD per token.
    pub const fn from_pico_per_token(p: i64) -> Self {
        Price(p)
    }

    /// Pico-USD per token.
    pub const fn pico_per_token(self) -> i64 {
        self.0
    }

    /// The cost of `tokens` tokens at this price.
    pub fn times(self, tokens: u64) -> Money {
        let t = i64::try_from(tokens).unwrap_or(i64::MAX);
        Money(self.0.saturating_mul(t))
    }

    /// USD per token as decimal text (OpenRouter's `/models` pricing format).
    pub fn per_token_usd(self) -> String {
        Money(self.0).to_string()
    }

    /// USD per million tokens as a float, for weights and comparisons only.
    pub fn per_mtok_f64(self) -> f64 {
        self.0 as f64 / 1e6
    }
}

impl fmt::Display for Price {
    /// USD per million tokens: `0.15`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // pico/token = USD/Mtok × 10⁶; reuse Money's decimal writer at 10⁶ scale.
        let whole = self.0 / 1_000_000;
        let frac = (self.0 % 1_000_000).unsigned_abs();
        if frac == 0 {
            return write!(f, "{whole}");
        }
        let digits = format!("{frac:06}");
        write!(f, "{whole}.{}", digits.trim_end_matches('0'))
    }
}

impl FromStr for Price {
    type Err = ParseMoneyError;
    /// Parses USD per million tokens, up to six decimal places, not negative.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let v = parse_scaled(s, 6)?;
        if v < 0 {
            return Err(ParseMoneyError::OutOfRange(s.into()));
        }
        Ok(Price(v))
    }
}

impl<'de> Deserialize<'de> for Price {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        decimal_text(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Price {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_exactly() {
        for s in ["0", "5", "0.000000000001", "123.45", "-1.5", "0.1"] {
            assert_eq!(s.parse::<Money>().unwrap().to_string(), s);
        }
        assert_eq!("0.15".parse::<Price>().unwrap().pico_per_token(), 150_000);
        assert_eq!("2.5".parse::<Price>().unwrap().to_string(), "2.5");
    }

    #[test]
    fn refuses_what_it_cannot_hold_exactly() {
        assert!(matches!(
            "0.0000001".parse::<Price>(),
            Err(ParseMoneyError::TooPrecise(..))
        ));
        assert!("1e-3".parse::<Money>().is_err());
        assert!("".parse::<Money>().is_err());
        assert!("-1".parse::<Price>().is_err());
        assert!("99999999999".parse::<Money>().is_err());
    }

    #[test]
    fn serialises_as_exact_json_number() {
        let m = Money::from_pico(123_456_789_012);
        assert_eq!(serde_json::to_string(&m).unwrap(), "0.123456789012");
        let back: Money = serde_json::from_str("0.123456789012").unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn cost_is_integer_arithmetic() {
        let p: Price = "0.6".parse().unwrap();
        // 7 tokens at $0.60/Mtok = $0.0000042 exactly.
        assert_eq!(p.times(7).to_string(), "0.0000042");
    }
}
