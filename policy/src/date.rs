//! Calendar dates, for dates of birth and ages. No clock: `today` is always
//! passed in.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{truncate, PolicyError};

/// A proleptic Gregorian calendar date, written `yyyy-mm-dd`; years 1 to 9999.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date {
    // Field order makes the derived ordering chronological.
    year: u16,
    month: u8,
    day: u8,
}

fn is_leap(year: u16) -> bool {
    matches!(
        (year % 400, year % 100, year % 4),
        (0, _, _) | (1.., 1.., 0)
    )
}

fn days_in_month(year: u16, month: u8) -> u8 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        2 => 28,
        _ => 0,
    }
}

impl Date {
    /// A date, if it exists in the calendar.
    pub fn new(year: u16, month: u8, day: u8) -> Result<Date, PolicyError> {
        if (1..=9999).contains(&year)
            && (1..=12).contains(&month)
            && day >= 1
            && day <= days_in_month(year, month)
        {
            Ok(Date { year, month, day })
        } else {
            Err(PolicyError::InvalidDate(format!(
                "{year:04}-{month:02}-{day:02}"
            )))
        }
    }

    /// Parses `yyyy-mm-dd` (exactly that shape).
    pub fn parse(s: &str) -> Result<Date, PolicyError> {
        let bad = || PolicyError::InvalidDate(truncate(s));
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return Err(bad());
        }
        let num = |r: std::ops::Range<usize>| -> Result<u16, PolicyError> {
            let part = s.get(r).ok_or_else(bad)?;
            if !part.bytes().all(|c| c.is_ascii_digit()) {
                return Err(bad());
            }
            part.parse().map_err(|_| bad())
        };
        let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        Date::new(
            y,
            u8::try_from(m).map_err(|_| bad())?,
            u8::try_from(d).map_err(|_| bad())?,
        )
    }

    /// The year.
    pub fn year(self) -> u16 {
        self.year
    }

    /// The month, 1 to 12.
    pub fn month(self) -> u8 {
        self.month
    }

    /// The day of the month, from 1.
    pub fn day(self) -> u8 {
        self.day
    }

    /// Days since 1970-01-01 (negative before). Howard Hinnant's algorithm.
    fn day_number(self) -> i64 {
        let y = i64::from(self.year) - i64::from(self.month <= 2);
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let m = i64::from(self.month);
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// Days from `self` to `later` (negative if `later` is earlier).
    pub fn days_until(self, later: Date) -> i64 {
        later.day_number() - self.day_number()
    }

    /// The anniversary of this date in `year`. A 29 February anniversary in a
    /// common year falls on 1 March (as a birthday does in English law).
    /// `None` if `year` is out of range.
    pub fn anniversary_in(self, year: u16) -> Option<Date> {
        if self.month == 2 && self.day == 29 && !is_leap(year) {
            return Date::new(year, 3, 1).ok();
        }
        Date::new(year, self.month, self.day).ok()
    }

    /// Age in whole years on `today` of someone born on `self`; `None` if
    /// `today` is before `self`.
    pub fn age_on(self, today: Date) -> Option<u32> {
        if today < self {
            return None;
        }
        let mut years = u32::from(today.year - self.year);
        match self.anniversary_in(today.year) {
            Some(birthday) if today < birthday => years = years.saturating_sub(1),
            _ => {}
        }
        Some(years)
    }
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

impl fmt::Debug for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Date({self})")
    }
}

impl FromStr for Date {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        Date::parse(s)
    }
}

impl Serialize for Date {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Date {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Date::parse(&s).map_err(serde::de::Error::custom)
    }
}
