//! Reading XFRM dump replies in place.
//!
//! A dump at 1000 peers has ~2000 states and ~2000 policies. Parsing each reply into a
//! netlink-packet-xfrm `ModifyMessage` allocated a `Vec` of attributes plus one per
//! attribute value (keys, replay bitmaps, templates), and inside UML fresh memory costs
//! a page fault per 4 KiB: that was most of the dump's parse cost. Instead the fixed
//! header is copied out by netlink-packet-xfrm's zero-copy parsers (`UserSaInfo::parse`,
//! `UserPolicyInfo::parse`: no allocation), the attributes are walked as borrowed
//! `NlaBuffer`s, and only the kinds we decide on are read; the rest are skipped unread.
//!
//! An attribute we read is refused when netlink-packet-xfrm would have refused it (same
//! length rules), so a reply the old parser accepted reads the same way here; a
//! malformed attribute of a kind we skip is no longer an error.

use netlink_packet_core::{NLA_HEADER_SIZE, NlasIterator};

use crate::kernel::batch::{DumpError, Reply};

/// Why a reply could not be read. Names sizes and kinds, never the bytes: a state
/// holds a key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum ReplyError {
    #[error("message type {kind} in the {what} dump")]
    Kind { what: &'static str, kind: u16 },
    #[error("a {what} message of {len} bytes")]
    Short { what: &'static str, len: usize },
    #[error("a {what} message with a malformed attribute header (attribute {index})")]
    Header { what: &'static str, index: usize },
    #[error("a {what} message with a {len}-byte attribute of type {kind}")]
    Attribute {
        what: &'static str,
        kind: u16,
        len: usize,
    },
}

impl From<ReplyError> for DumpError {
    fn from(e: ReplyError) -> DumpError {
        DumpError::Unexpected(e.to_string())
    }
}

/// The payload of a dump reply of type `kind`, checked to hold at least the `min_len`
/// bytes of its fixed part.
pub(super) fn payload<'a>(
    reply: Reply<'a>,
    kind: u16,
    min_len: usize,
    what: &'static str,
) -> Result<&'a [u8], ReplyError> {
    if reply.kind != kind {
        return Err(ReplyError::Kind {
            what,
            kind: reply.kind,
        });
    }
    if reply.payload.len() < min_len {
        return Err(ReplyError::Short {
            what,
            len: reply.payload.len(),
        });
    }
    Ok(reply.payload)
}

/// One attribute: its type (flags masked off) and its value, borrowed from the reply.
#[derive(Clone, Copy)]
pub(super) struct Attr<'a> {
    pub kind: u16,
    pub value: &'a [u8],
}

impl<'a> Attr<'a> {
    /// The error for a value of the wrong size for its kind.
    pub fn malformed(&self, what: &'static str) -> ReplyError {
        ReplyError::Attribute {
            what,
            kind: self.kind,
            len: self.value.len(),
        }
    }
}

/// The attributes in `bytes` (what follows a fixed header), in order. A header that
/// does not fit ends the walk with an error, as it ended netlink-packet-xfrm's parse.
pub(super) fn attributes<'a>(
    bytes: &'a [u8],
    what: &'static str,
) -> impl Iterator<Item = Result<Attr<'a>, ReplyError>> {
    NlasIterator::new(bytes)
        .enumerate()
        .map(move |(index, nla)| {
            let malformed = ReplyError::Header { what, index };
            // `new_checked` (inside the iterator) has checked 4 <= length <= what is left.
            let nla = nla.map_err(|_| malformed.clone())?;
            let kind = nla.kind();
            let end = usize::from(nla.length());
            // `NlaBuffer::value` borrows from the buffer value, not from `bytes`.
            let value = nla
                .into_inner()
                .get(NLA_HEADER_SIZE..end)
                .ok_or(malformed)?;
            Ok(Attr { kind, value })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_walked_in_place_and_bad_headers_are_errors() {
        // kind 7, 5 bytes of value (padded to 8), then kind 0x8009 (nested flag), empty.
        let bytes = [9, 0, 7, 0, 1, 2, 3, 4, 5, 0, 0, 0, 4, 0, 9, 0x80];
        let attrs: Vec<_> = attributes(&bytes, "test")
            .map(|a| a.map(|a| (a.kind, a.value)))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(attrs, [(7, &[1, 2, 3, 4, 5][..]), (9, &[][..])]);

        for bad in [&bytes[..6], &bytes[..14], &[3, 0, 1, 0][..], &[2][..]] {
            let last = attributes(bad, "test").last().unwrap();
            assert!(matches!(last, Err(ReplyError::Header { .. })), "{bad:?}");
        }
        assert_eq!(attributes(&[], "test").count(), 0);
    }
}
