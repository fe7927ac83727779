//! The spec as YAML spells it: a serde model that mirrors the file one to one, with the
//! source location of every value that a later rule may need to point at.
//!
//! Nothing here is validated beyond YAML shape: unknown keys are refused
//! (`deny_unknown_fields`), everything else is checked in [`super::validate`], which can
//! then name the exact `line:column` of the offending value.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// Just enough of the document to check `apiVersion` before anything else, so that a
/// spec written for another version is told so instead of tripping over field names.
#[derive(Debug, Deserialize)]
pub(super) struct RawHeader {
    #[serde(rename = "apiVersion", default)]
    pub api_version: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawSpec {
    #[serde(default)]
    pub api_version: Req<String>,
    #[serde(default)]
    pub cluster: Req<RawCluster>,
    #[serde(default)]
    pub nodes: Req<Vec<Spanned<RawNode>>>,
    #[serde(default)]
    pub networks: Option<Spanned<Vec<Spanned<RawNetwork>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawCluster {
    #[serde(default)]
    pub name: Req<String>,
    #[serde(default)]
    pub control_port: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub data_port: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub encrypted_data_port: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub rotation: Option<Spanned<String>>,
    #[serde(default)]
    pub rekey_after_packets: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub rekey_after_bytes: Option<Spanned<Scalar>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawNode {
    #[serde(default)]
    pub name: Req<String>,
    #[serde(default)]
    pub address: Req<String>,
    #[serde(default)]
    pub public_key: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawNetwork {
    #[serde(default)]
    pub name: Req<String>,
    #[serde(default)]
    pub vni: Req<Scalar>,
    #[serde(default, deserialize_with = "given")]
    pub encrypted: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub mtu: Option<Spanned<Scalar>>,
    #[serde(default, deserialize_with = "given")]
    pub nodes: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub addresses: Option<Spanned<Entries>>,
}

/// An optional field whose key, when present, must have a value: `encrypted:` or
/// `nodes:` with nothing after it is a slip of the pen, and their defaults (plaintext,
/// every node) are the opposite of what such a slip meant. Other optional fields take
/// null as their default, which is harmless.
fn given<'de, D, T>(d: D) -> Result<Option<Spanned<T>>, D::Error>
where
    D: de::Deserializer<'de>,
    T: Deserialize<'de>,
{
    let s = Spanned::<Option<T>>::deserialize(d)?;
    match s.value {
        Some(value) => Ok(Some(Spanned::new(value, s.referenced, s.defined))),
        None => Err(de::Error::custom(
            "a key without a value (null): give it a value, or leave the key out for its \
             default",
        )),
    }
}

/// A required field. Missing (`None`) and null (`Some` of `None`) are told apart and
/// reported by the validator, a missing one at its parent mapping, a null one at the null.
#[derive(Debug)]
pub(super) struct Req<T>(pub Option<Spanned<Option<T>>>);

impl<T> Default for Req<T> {
    fn default() -> Self {
        Req(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Req<T> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Spanned::<Option<T>>::deserialize(d).map(|s| Req(Some(s)))
    }
}

/// A YAML node read without a target type, so that the validator (not serde) words the
/// error for a value of the wrong type and points at the value itself.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Scalar {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Sequence,
    Mapping,
}

impl Scalar {
    /// How the value reads in an error message ("a string `abc`", "a sequence").
    pub fn describe(&self) -> String {
        match self {
            Scalar::Null => "null".to_owned(),
            Scalar::Bool(b) => format!("the boolean {b}"),
            Scalar::Int(i) => format!("the integer {i}"),
            Scalar::Float(f) if f.is_finite() && f.fract() == 0.0 => {
                format!("the number {f:.0} (not a plain integer)")
            }
            Scalar::Float(f) => format!("the number {f}"),
            Scalar::Str(s) => format!("the string {}", quote(s)),
            Scalar::Sequence => "a sequence".to_owned(),
            Scalar::Mapping => "a mapping".to_owned(),
        }
    }
}

/// Quote user text for a one-line message: backquoted, control characters escaped, long
/// values cut, so a hostile value cannot forge extra lines or flood the terminal.
pub(super) fn quote(s: &str) -> String {
    const MAX_CHARS: usize = 64;
    let mut out = String::from("`");
    for (i, c) in s.chars().enumerate() {
        if i == MAX_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.push('`');
    out
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<Scalar, E> {
        Ok(Scalar::Null)
    }
    fn visit_none<E>(self) -> Result<Scalar, E> {
        Ok(Scalar::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Scalar, E> {
        Ok(Scalar::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Scalar, E> {
        Ok(Scalar::Int(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Scalar, E> {
        Ok(Scalar::Int(v.into()))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Scalar, E> {
        Ok(Scalar::Int(v))
    }
    fn visit_u128<E>(self, v: u128) -> Result<Scalar, E> {
        // Beyond i128 is beyond every range we accept; saturate rather than fail here.
        Ok(Scalar::Int(i128::try_from(v).unwrap_or(i128::MAX)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Scalar, E> {
        Ok(Scalar::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Scalar, E> {
        Ok(Scalar::Str(v.to_owned()))
    }
    fn visit_bytes<E>(self, _: &[u8]) -> Result<Scalar, E> {
        Ok(Scalar::Str("<binary>".to_owned()))
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Scalar, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Sequence)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Mapping)
    }
}

/// A YAML mapping kept as its entries in file order, each key and value with its
/// location (a `BTreeMap` would need `Ord` on spans and would lose the key locations).
/// Duplicate keys never get here: the parser refuses them.
#[derive(Debug, Default)]
pub(super) struct Entries(pub Vec<(Spanned<String>, Spanned<String>)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping of node name to address/prefix")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        d.deserialize_map(EntriesVisitor)
    }
}
