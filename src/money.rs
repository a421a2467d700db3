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

// Bounds on every amount the gateway accepts (config, CLI, admin API). They make
// overflow impossible by construction: a key's credits (and its limit) are at most
// [`MAX_CREDITS`], so credits + one top-up ≤ 2 × 10¹⁸ and a key's spending, which
// never passes its credits (every charge fits in its reservation), stays far below
// `i64::MAX` (≈ 9.2 × 10¹⁸ pico-USD). The ledger still adds with checked arithmetic
// and refuses, with an error, anything past these bounds.

/// The most credit a key can hold, and the largest `limit_usd`: $1,000,000
/// (10¹⁸ pico-USD). A top-up that would take a key's credits past it is refused.
pub const MAX_CREDITS: Money = Money(1_000_000 * PICO_PER_USD);

/// The largest single charge the ledger accepts: [`MAX_CREDITS`] (a charge never
/// exceeds its reservation, which never exceeds what the key holds).
pub const MAX_CHARGE: Money = MAX_CREDITS;

/// The most a key's spending may reach in the ledger: 2 × [`MAX_CREDITS`]. Only a
/// charge larger than its own reservation (a bug elsewhere) can get near it; one that
/// would pass it is refused instead of wrapping.
pub const MAX_SPENT: Money = Money(2 * MAX_CREDITS.0);

/// The highest price accepted for a token kind: $10,000 per million tokens (10¹⁰
/// pico-USD a token), far above any real model's, so that [`MAX_MODEL_TOKENS`] at
/// this price is exactly [`MAX_CHARGE`].
pub const MAX_PRICE: Price = Price(10_000 * 1_000_000);

/// The largest token count accepted for a model's `context_length` and
/// `max_output_tokens`: 100 million.
pub const MAX_MODEL_TOKENS: u64 = 100_000_000;

/// The largest `tokens_per_day` of a key: 10¹⁵ (fits SQLite's signed 64-bit
/// integers with room for a day's sum).
pub const MAX_TOKENS_PER_DAY: u64 = 1_000_000_000_000_000;

/// The largest `rpm` of a key: 1,000,000 requests a minute.
pub const MAX_RPM: u32 = 1_000_000;

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

    /// Adds, or `None` on overflow. Whatever changes stored state (the ledger's
    /// spending, a top-up) adds with this, never with `+`.
    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.0.checked_add(other.0).map(Money)
    }

    /// Subtracts, or `None` on overflow.
    pub fn checked_sub(self, other: Money) -> Option<Money> {
        self.0.checked_sub(other.0).map(Money)
    }

    /// Whether the amount is in `0..=max`.
    pub fn within(self, max: Money) -> bool {
        (0..=max.0).contains(&self.0)
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

/// `+` **saturates** (it is [`Money::saturating_add`]): it is used only where the
/// bounds ([`MAX_CREDITS`], [`MAX_PRICE`], …) make overflow impossible, or where a
/// saturated result is refused anyway (a reserve of `i64::MAX` pico-USD is more than
/// any key can hold). State that is stored adds with [`Money::checked_add`].
impl std::ops::Add for Money {
    type Output = Money;
    fn add(self, rhs: Money) -> Money {
        self.saturating_add(rhs)
    }
}

/// `-` **saturates** (it is [`Money::saturating_sub`]); see [`Add`](#impl-Add-for-Money).
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
    struct DecimalText;
    impl serde::de::Visitor<'_> for DecimalText {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a decimal number such as 1.25 (or the text \"1.25\")")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
            Ok(format!("{v}"))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(DecimalText)
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

    /// The cost of `tokens` tokens at this price, **saturating** at `i64::MAX`
    /// pico-USD: a saturated cost is more than any key can hold ([`MAX_CREDITS`]),
    /// so a reserve of it is refused and a charge of it is capped or refused, never
    /// wrapped. [`Price::checked_times`] says when it would overflow.
    pub fn times(self, tokens: u64) -> Money {
        self.checked_times(tokens).unwrap_or(Money(i64::MAX))
    }

    /// The cost of `tokens` tokens at this price, or `None` if it does not fit.
    pub fn checked_times(self, tokens: u64) -> Option<Money> {
        let t = i64::try_from(tokens).ok()?;
        self.0.checked_mul(t).map(Money)
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

    #[test]
    fn checked_operations_refuse_what_would_wrap() {
        let max = Money::from_pico(i64::MAX);
        assert_eq!(max.checked_add(Money::from_pico(1)), None);
        assert_eq!(
            Money::from_pico(i64::MIN).checked_sub(Money::from_pico(1)),
            None
        );
        assert_eq!(max + Money::from_pico(1), max, "`+` saturates");
        let p: Price = "10000".parse().unwrap();
        assert_eq!(p, MAX_PRICE);
        assert_eq!(p.checked_times(u64::MAX), None);
        assert_eq!(p.checked_times(1u64 << 62), None);
        assert_eq!(p.times(1u64 << 62), max, "`times` saturates");
        // A model's most tokens at the highest price is the largest charge.
        assert_eq!(p.checked_times(MAX_MODEL_TOKENS), Some(MAX_CHARGE));
        assert!(MAX_CREDITS.within(MAX_CREDITS) && !Money::from_pico(-1).within(MAX_CREDITS));
        // The bounds leave room: credits + a top-up, and the most spent, fit.
        assert!(MAX_CREDITS.checked_add(MAX_CREDITS).is_some());
        assert!(MAX_SPENT.checked_add(MAX_CHARGE).is_some());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn money_prints_and_parses_back_exactly(pico in any::<i64>()) {
                let m = Money::from_pico(pico);
                let text = m.to_string();
                prop_assert_eq!(text.parse::<Money>().unwrap(), m);
                // As a JSON string, exact whatever the digits.
                let quoted = serde_json::to_string(&text).unwrap();
                prop_assert_eq!(serde_json::from_str::<Money>(&quoted).unwrap(), m);
            }

            #[test]
            fn money_as_a_json_number_is_exact_up_to_15_digits(
                pico in -999_999_999_999_999i64..=999_999_999_999_999,
            ) {
                // A JSON number arrives as a float: exact up to 15 significant
                // digits (see `decimal_text`); more digits must come as a string.
                let m = Money::from_pico(pico);
                let json = serde_json::to_string(&m).unwrap();
                prop_assert_eq!(serde_json::from_str::<Money>(&json).unwrap(), m);
            }

            #[test]
            fn prices_print_and_parse_back_exactly(p in 0..=i64::MAX) {
                let price = Price::from_pico_per_token(p);
                prop_assert_eq!(price.to_string().parse::<Price>().unwrap(), price);
            }

            #[test]
            fn checked_money_arithmetic_is_exact_or_none(a in any::<i64>(), b in any::<i64>()) {
                let (x, y) = (Money::from_pico(a), Money::from_pico(b));
                let sum = i128::from(a) + i128::from(b);
                let diff = i128::from(a) - i128::from(b);
                prop_assert_eq!(x.checked_add(y).map(|m| i128::from(m.pico())),
                    i64::try_from(sum).ok().map(i128::from));
                prop_assert_eq!(x.checked_sub(y).map(|m| i128::from(m.pico())),
                    i64::try_from(diff).ok().map(i128::from));
                // Saturating `+` / `-` never wrap: they land on the exact value or a bound.
                prop_assert_eq!(i128::from((x + y).pico()), sum.clamp(i64::MIN.into(), i64::MAX.into()));
                prop_assert_eq!(i128::from((x - y).pico()), diff.clamp(i64::MIN.into(), i64::MAX.into()));
            }

            #[test]
            fn price_times_tokens_is_exact_or_refused(p in 0..=i64::MAX, tokens in any::<u64>()) {
                let price = Price::from_pico_per_token(p);
                let exact = i128::from(p) * i128::from(tokens);
                match price.checked_times(tokens) {
                    Some(m) => prop_assert_eq!(i128::from(m.pico()), exact),
                    None => prop_assert!(exact > i128::from(i64::MAX)),
                }
                prop_assert!(i128::from(price.times(tokens).pico()) == exact.min(i64::MAX.into()));
            }

            #[test]
            fn within_the_bounds_nothing_can_overflow(
                p in 0..=MAX_PRICE.pico_per_token(),
                tokens in 0..=MAX_MODEL_TOKENS,
            ) {
                // A whole model's worth of tokens at the highest price fits a charge.
                let cost = Price::from_pico_per_token(p).checked_times(tokens).unwrap();
                prop_assert!(cost <= MAX_CHARGE);
            }
        }
    }
}
