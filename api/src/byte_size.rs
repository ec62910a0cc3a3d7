//! A byte count that users write either as a number of bytes or as a string with a unit.
//!
//! Used wherever a person types a size: the create and resize requests of the local API and
//! the pool sizes of the config file. Strings are parsed by [`crate::parse_size`], so the
//! CLI, the API and the config file accept exactly the same spellings (`10GiB`, `500MiB`,
//! `1G`, `4096`).
//!
//! Invariant: a [`ByteSize`] is never zero; both spellings are validated on deserialization.

use std::fmt;

use crate::{parse_size, ControlError};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A validated, non-zero number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(u64);

impl ByteSize {
    /// Parse a size written by a person (`10GiB`, `500MiB`, `1G`, `4096`).
    ///
    /// # Errors
    /// `InvalidArgument` naming the bad input and showing valid examples.
    pub fn parse(text: &str) -> Result<Self, ControlError> {
        parse_size(text).map(Self)
    }

    /// A size of `bytes`, or `None` for zero.
    pub fn from_bytes(bytes: u64) -> Option<Self> {
        (bytes > 0).then_some(Self(bytes))
    }

    /// The number of bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::format_size(self.0))
    }
}

impl Serialize for ByteSize {
    /// Always serialized as a plain number of bytes, the unambiguous spelling.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;

        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: a number of bytes or a string such as \"10GiB\"")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                ByteSize::from_bytes(v).ok_or_else(|| E::custom("a size must be greater than zero"))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("a size cannot be negative (got {v})")))
                    .and_then(|v| self.visit_u64(v))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ByteSize, E> {
                Err(E::custom(format!(
                    "a size in bytes must be a whole number (got {v}); write fractions with a unit, e.g. \"1.5GiB\""
                )))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(|e| E::custom(e.message()))
            }
        }

        deserializer.deserialize_any(SizeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Holder {
        size: ByteSize,
    }

    fn size(json: &str) -> Result<u64, String> {
        serde_json::from_str::<Holder>(json)
            .map(|h| h.size.bytes())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn accepts_numbers_and_units() {
        assert_eq!(size(r#"{"size": 4096}"#).unwrap(), 4096);
        assert_eq!(size(r#"{"size": "1GiB"}"#).unwrap(), 1 << 30);
        assert_eq!(size(r#"{"size": "500MiB"}"#).unwrap(), 500 << 20);
    }

    #[test]
    fn rejects_nonsense_with_a_message() {
        assert!(size(r#"{"size": 0}"#)
            .unwrap_err()
            .contains("greater than zero"));
        assert!(size(r#"{"size": -5}"#).unwrap_err().contains("negative"));
        assert!(size(r#"{"size": 1.5}"#)
            .unwrap_err()
            .contains("whole number"));
        assert!(size(r#"{"size": "banana"}"#)
            .unwrap_err()
            .contains("invalid size"));
        assert!(size(r#"{"size": true}"#).unwrap_err().contains("a size"));
    }

    #[test]
    fn serializes_as_bytes() {
        assert_eq!(
            serde_json::to_string(&ByteSize::parse("1KiB").unwrap()).unwrap(),
            "1024"
        );
    }
}
