//! Dumps on a [`BatchSocket`]: one request, the replies read into one reused buffer
//! and handed to the caller in place, message by message.
//!
//! This replaces netlink-proto for `Kernel::dump`, which copied every reply through a
//! `BytesMut`, an unbounded channel and owned messages: at thousands of objects that
//! copying, its allocations and their page faults (very expensive inside UML) were most
//! of a dump's cost.
//!
//! The kernel sizes each part of a dump after the largest buffer `recvmsg()` was given on
//! the socket (at most 32 KiB), and queues the next part while we read one, so a dump is
//! one `recv()` per ~32 KiB. A part that does not fit [`DUMP_BUFFER`] is an error, never
//! a silent truncation (`MSG_TRUNC` reports its true length).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use zeroize::Zeroize;

use super::{BatchSocket, NLMSG_ERROR, NLMSG_HDRLEN, aligned};
use crate::kernel::KernelError;

/// The receive buffer of dumps: twice the kernel's 32 KiB parts, for link dumps whose
/// messages the kernel sizes larger (`min_dump_alloc`).
const DUMP_BUFFER: usize = 64 << 10;

/// How long one whole dump may take. Generous: thousands of objects inside UML take
/// seconds at worst; a kernel that stops answering must not hang the agent.
const DUMP_TIMEOUT: Duration = Duration::from_secs(30);

/// A dump that the kernel marks as interrupted (NLM_F_DUMP_INTR: the table changed while
/// it was read) is started over, up to this many attempts in all, after a pause that
/// doubles from [`DUMP_RETRY_FIRST_PAUSE`] (about 2.5 s of pauses in all): a host whose
/// link table is busy (containers coming and going) interrupts long dumps often, but
/// not for seconds on end.
const DUMP_ATTEMPTS: usize = 10;
const DUMP_RETRY_FIRST_PAUSE: Duration = Duration::from_millis(5);
/// Attempts for a view that is only shown (see `BatchSocket::accept_unsettled`).
const DISPLAY_DUMP_ATTEMPTS: usize = 3;

const NLMSG_NOOP: u16 = 1;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;

/// Whether a dump's replies carry secrets (XFRM states: keys), to be zeroed in our
/// buffer as soon as they are handled.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(in crate::kernel) enum Secrets {
    No,
    Zeroize,
}

/// Why a dump failed, before it gets its operation name ([`DumpError::into_kernel`]).
#[derive(Debug)]
pub(in crate::kernel) enum DumpError {
    /// The kernel refused it with this errno (positive).
    Errno(i32),
    Send(io::Error),
    Receive(io::Error),
    Timeout,
    /// Interrupted [`DUMP_ATTEMPTS`] times in a row.
    Interrupted,
    /// A reply we cannot read (the caller's decode errors too).
    Unexpected(String),
}

impl DumpError {
    pub fn into_kernel(self, operation: &str) -> KernelError {
        let operation = operation.to_owned();
        let netlink = |message: String| KernelError::Netlink {
            operation: operation.clone(),
            message,
        };
        match self {
            DumpError::Errno(errno) => KernelError::Refused {
                source: io::Error::from_raw_os_error(errno),
                operation,
            },
            DumpError::Send(e) => netlink(format!("sending the dump request failed: {e}")),
            DumpError::Receive(e) => netlink(format!("reading the dump failed: {e}")),
            DumpError::Timeout => netlink(format!(
                "no complete answer within {} s",
                DUMP_TIMEOUT.as_secs()
            )),
            DumpError::Interrupted => netlink(format!(
                "the dump was interrupted {DUMP_ATTEMPTS} times in a row"
            )),
            DumpError::Unexpected(detail) => KernelError::Unexpected {
                what: "netlink reply",
                detail: format!("{detail} in {operation}"),
            },
        }
    }
}

/// One reply of a dump: its netlink message type and its payload (after the header).
pub(in crate::kernel) struct Reply<'a> {
    pub kind: u16,
    pub payload: &'a [u8],
}

/// A dump request: `inner` with `NLM_F_REQUEST | NLM_F_DUMP` (sequence number set by
/// [`BatchSocket::dump`]).
pub(in crate::kernel) fn request<I>(inner: I) -> Vec<u8>
where
    I: NetlinkSerializable + Into<NetlinkPayload<I>>,
{
    let mut message = NetlinkMessage::from(inner);
    message.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    message.finalize();
    let mut bytes = vec![0; message.buffer_len()];
    message.serialize(&mut bytes);
    bytes
}

impl BatchSocket {
    /// Runs the dump `request` ([`request`]) and folds its replies into a `T` started
    /// from `start()`, one at a time as they are read; started over while the kernel
    /// reports the dump as interrupted. An error from `each` ends the dump.
    ///
    /// With [`Secrets::Zeroize`], every part is zeroed in our buffer once handled (also
    /// when `each` fails); what `each` copies out is its own to scrub.
    pub async fn dump<T>(
        &mut self,
        request: &[u8],
        secrets: Secrets,
        start: impl Fn() -> T,
        mut each: impl FnMut(&mut T, Reply<'_>) -> Result<(), DumpError>,
    ) -> Result<T, DumpError> {
        let mut pause = DUMP_RETRY_FIRST_PAUSE;
        // A view only shown is not worth seconds of waiting for the kernel to settle.
        let attempts = if self.accept_unsettled {
            DISPLAY_DUMP_ATTEMPTS
        } else {
            DUMP_ATTEMPTS
        };
        for round in 0..attempts {
            if round > 0 {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            let mut acc = start();
            let attempt = self.dump_once(request, secrets, |r| each(&mut acc, r));
            let ended = tokio::time::timeout(DUMP_TIMEOUT, attempt).await;
            match ended {
                Err(_) => return Err(DumpError::Timeout),
                Ok(Ok(Ended::Complete)) => return Ok(acc),
                Ok(Ok(Ended::Interrupted)) if self.accept_unsettled && round + 1 == attempts => {
                    self.unsettled = true;
                    return Ok(acc);
                }
                Ok(Ok(Ended::Interrupted)) => {}
                Ok(Err(e)) => return Err(e),
            }
        }
        Err(DumpError::Interrupted)
    }

    async fn dump_once(
        &mut self,
        request: &[u8],
        secrets: Secrets,
        mut each: impl FnMut(Reply<'_>) -> Result<(), DumpError>,
    ) -> Result<Ended, DumpError> {
        // Parts of a dump abandoned earlier (an error, a cancelled future) would make
        // the kernel refuse a new one with EBUSY.
        self.drain();
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        let mut message = request.to_vec();
        if let Some(field) = message.get_mut(8..12) {
            field.copy_from_slice(&seq.to_ne_bytes());
        }
        self.unread = true;
        self.send(&message).await.map_err(DumpError::Send)?;

        let mut buf = take_buffer();
        let mut interrupted = false;
        let result = loop {
            let len = match self.recv_part(&mut buf).await {
                Ok(len) => len,
                Err(e) => break Err(DumpError::Receive(e)),
            };
            let truncated = len > buf.len();
            let part = Part {
                bytes: &mut buf,
                secrets,
            };
            if truncated {
                break Err(DumpError::Unexpected(format!(
                    "a dump part of {len} bytes (more than the {DUMP_BUFFER} we read)"
                )));
            }
            match walk(part.bytes(), seq, &mut interrupted, &mut each) {
                Ok(false) => {}
                Ok(true) if interrupted => break Ok(Ended::Interrupted),
                Ok(true) => break Ok(Ended::Complete),
                Err(e) => break Err(e),
            }
        };
        if result.is_ok() {
            self.unread = false; // read up to NLMSG_DONE
        }
        give_back(buf);
        result
    }

    /// Reads one datagram into `buf` (replacing its contents, never past its capacity);
    /// returns the datagram's full length, which exceeds `buf.len()` when it did not
    /// fit (`MSG_TRUNC`: the rest is lost).
    async fn recv_part(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        buf.clear();
        loop {
            let mut guard = self.fd.readable().await?;
            let spare = buf.spare_capacity_mut();
            let result = guard.try_io(|fd| {
                // SAFETY: `spare` is valid for writes of `spare.len()` bytes for the call.
                let rc = unsafe {
                    libc::recv(
                        fd.get_ref().as_raw_fd(),
                        spare.as_mut_ptr().cast(),
                        spare.len(),
                        libc::MSG_TRUNC,
                    )
                };
                usize::try_from(rc).map_err(|_| io::Error::last_os_error())
            });
            match result {
                Ok(Ok(len)) => {
                    let written = len.min(buf.capacity());
                    // SAFETY: the kernel wrote the first `written` bytes of the spare
                    // capacity (a datagram is cut at the buffer's end, never past it).
                    unsafe { buf.set_len(written) };
                    return Ok(len);
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// The receive buffer, shared by every dump of the process whatever its socket: memory
/// touched for the first time costs a page fault per 4 KiB (~50 µs each inside UML),
/// so it is reused, and never zero-filled (the kernel writes what we read).
static SPARE_BUFFER: Mutex<Vec<u8>> = Mutex::new(Vec::new());

fn take_buffer() -> Vec<u8> {
    let mut buf = SPARE_BUFFER
        .lock()
        .map(|mut spare| std::mem::take(&mut *spare))
        .unwrap_or_default();
    buf.clear();
    buf.reserve_exact(DUMP_BUFFER);
    buf
}

/// Keeps `buf` for the next dump (one at a time: a concurrent dump got its own).
fn give_back(mut buf: Vec<u8>) {
    buf.clear();
    if let Ok(mut spare) = SPARE_BUFFER.lock()
        && spare.capacity() < buf.capacity()
    {
        *spare = buf;
    }
}

enum Ended {
    Complete,
    Interrupted,
}

/// One datagram in our buffer, zeroed when dropped if it may hold secrets: on every
/// path out of the loop, including a failing `each`.
struct Part<'a> {
    bytes: &'a mut [u8],
    secrets: Secrets,
}

impl Part<'_> {
    fn bytes(&self) -> &[u8] {
        self.bytes
    }
}

impl Drop for Part<'_> {
    fn drop(&mut self) {
        if self.secrets == Secrets::Zeroize {
            zeroize_fast(self.bytes);
        }
    }
}

/// `bytes.zeroize()`, a word at a time: `zeroize` writes a `[u8]` one volatile byte
/// at a time, and a state dump at 1000 peers is ~1 MB of replies to scrub.
fn zeroize_fast(bytes: &mut [u8]) {
    // SAFETY: every bit pattern is a valid u64, and `align_to_mut` only hands out the
    // aligned middle as u64s; the unaligned ends stay bytes.
    let (head, words, tail) = unsafe { bytes.align_to_mut::<u64>() };
    head.zeroize();
    words.zeroize();
    tail.zeroize();
}

/// Hands the replies to our request (`seq`) in one datagram to `each`; `Ok(true)` once
/// the dump is over. Messages of other sequence numbers (answers to an earlier batch)
/// are skipped.
fn walk(
    datagram: &[u8],
    seq: u32,
    interrupted: &mut bool,
    each: &mut impl FnMut(Reply<'_>) -> Result<(), DumpError>,
) -> Result<bool, DumpError> {
    let malformed = || DumpError::Unexpected("a malformed netlink message".into());
    let mut rest = datagram;
    while !rest.is_empty() {
        let header = rest.get(..NLMSG_HDRLEN).ok_or_else(malformed)?;
        let u32_at = |at: usize| {
            header
                .get(at..at + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map_or(0, u32::from_ne_bytes)
        };
        let u16_at = |at: usize| {
            header
                .get(at..at + 2)
                .and_then(|b| <[u8; 2]>::try_from(b).ok())
                .map_or(0, u16::from_ne_bytes)
        };
        let len = u32_at(0) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(malformed());
        }
        let (kind, flags) = (u16_at(4), u16_at(6));
        let payload = rest.get(NLMSG_HDRLEN..len).unwrap_or_default();
        rest = rest.get(aligned(len)..).unwrap_or_default();
        if u32_at(8) != seq {
            continue;
        }
        *interrupted |= flags & NLM_F_DUMP_INTR != 0;
        match kind {
            NLMSG_NOOP => {}
            // An error code (negative errno) leads both; an ACK (0) would end it too.
            NLMSG_DONE | NLMSG_ERROR => {
                let code = payload
                    .get(..4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map_or(0, i32::from_ne_bytes);
                return match code {
                    0 => Ok(true),
                    code => Err(DumpError::Errno(code.saturating_abs())),
                };
            }
            NLMSG_OVERRUN => return Err(DumpError::Unexpected("an overrun".into())),
            kind => each(Reply { kind, payload })?,
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(aligned(m.len()), 0);
        m
    }

    /// What `walk` made of a datagram: its result, the replies handed out, and whether
    /// the dump was marked as interrupted.
    struct Walked {
        result: Result<bool, DumpError>,
        seen: Vec<(u16, Vec<u8>)>,
        interrupted: bool,
    }

    fn collect(datagram: &[u8], seq: u32) -> Walked {
        let mut seen = Vec::new();
        let mut interrupted = false;
        let result = walk(datagram, seq, &mut interrupted, &mut |r: Reply<'_>| {
            seen.push((r.kind, r.payload.to_vec()));
            Ok(())
        });
        Walked {
            result,
            seen,
            interrupted,
        }
    }

    #[test]
    fn walk_hands_out_replies_until_done() {
        let mut d = message(20, 0, 5, &[1, 2, 3]); // odd length: padded
        d.extend(message(20, 0, 4, &[9])); // another request's: skipped
        d.extend(message(NLMSG_NOOP, 0, 5, &[]));
        d.extend(message(21, 0, 5, &[4; 8]));
        let w = collect(&d, 5);
        assert!(matches!(w.result, Ok(false)));
        assert_eq!(w.seen, vec![(20, vec![1, 2, 3]), (21, vec![4; 8])]);
        assert!(!w.interrupted);

        let mut d = message(20, NLM_F_DUMP_INTR, 5, &[1]);
        d.extend(message(NLMSG_DONE, 0, 5, &0i32.to_ne_bytes()));
        d.extend(message(20, 0, 5, &[2])); // after the end: never handed out
        let w = collect(&d, 5);
        assert!(matches!(w.result, Ok(true)));
        assert_eq!(w.seen, vec![(20, vec![1])]);
        assert!(w.interrupted);
    }

    #[test]
    fn walk_reports_kernel_errors_and_malformed_data() {
        let d = message(NLMSG_ERROR, 0, 5, &(-libc::EPERM).to_ne_bytes());
        assert!(matches!(
            collect(&d, 5).result,
            Err(DumpError::Errno(libc::EPERM))
        ));
        let d = message(NLMSG_DONE, 0, 5, &(-libc::EBUSY).to_ne_bytes());
        assert!(matches!(
            collect(&d, 5).result,
            Err(DumpError::Errno(libc::EBUSY))
        ));
        let d = message(NLMSG_DONE, 0, 5, &[]); // no error code: complete
        assert!(matches!(collect(&d, 5).result, Ok(true)));

        let mut d = message(20, 0, 5, &[1]);
        d.extend_from_slice(&[0xff; 10]); // a truncated header
        let w = collect(&d, 5);
        assert!(matches!(w.result, Err(DumpError::Unexpected(_))));
        assert_eq!(w.seen.len(), 1);
        let mut d = message(20, 0, 5, &[1]);
        d[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(matches!(
            collect(&d, 5).result,
            Err(DumpError::Unexpected(_))
        ));
        assert!(matches!(collect(&[], 5).result, Ok(false)));
    }

    #[test]
    fn each_can_stop_the_walk() {
        let mut d = message(20, 0, 5, &[1]);
        d.extend(message(20, 0, 5, &[2]));
        let mut calls = 0;
        let r = walk(&d, 5, &mut false, &mut |_r: Reply<'_>| {
            calls += 1;
            Err(DumpError::Unexpected("stop".into()))
        });
        assert!(matches!(r, Err(DumpError::Unexpected(_))));
        assert_eq!(calls, 1);
    }

    #[test]
    fn a_part_with_secrets_is_zeroed_when_dropped() {
        let mut buf = [7u8; 64];
        drop(Part {
            bytes: &mut buf[..32],
            secrets: Secrets::Zeroize,
        });
        assert!(buf[..32].iter().all(|b| *b == 0));
        assert!(buf[32..].iter().all(|b| *b == 7));
        drop(Part {
            bytes: &mut buf[32..],
            secrets: Secrets::No,
        });
        assert!(buf[32..].iter().all(|b| *b == 7));
        // Any alignment and length: every byte zeroed, none beyond.
        for start in 0..9 {
            for end in start..40 {
                let mut buf = [7u8; 48];
                zeroize_fast(&mut buf[start..end]);
                assert!(buf[start..end].iter().all(|b| *b == 0));
                assert!(buf[..start].iter().chain(&buf[end..]).all(|b| *b == 7));
            }
        }
    }
}
