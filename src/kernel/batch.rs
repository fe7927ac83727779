//! Many netlink requests per `send()`: the executor's fast path.
//!
//! ```text
//! push(request) ... push(request) --flush--> one buffer, one send()
//!     kernel: runs every message in order; queues an NLMSG_ERROR for each one that
//!     fails, and the ACK of the last one (the only one with NLM_F_ACK)
//! recv until the last sequence number is answered (or the deadline); errors by sequence
//! ```
//!
//! The kernel handles a buffer of requests synchronously inside `send()`, in order
//! (`netlink_rcv_skb`), and answers a message with an `NLMSG_ERROR` when it failed or
//! when it asked for an ACK (`NLM_F_ACK`, errno 0). So only the last message of a buffer
//! asks for one: its answer comes after the error of every earlier message, which makes
//! the whole buffer one `send()` and, unless something failed, one `recv()` (an ACK per
//! message costs a `recv()` each, ~20 µs apiece inside UML). Errors are matched to
//! requests by sequence number.
//!
//! The kernel does not stop at a failing message: the ones after it in the same buffer
//! are still run. Hence the contract of [`Batch::flush`]:
//!
//! - the first failing message (in send order) is the error reported; nothing is sent
//!   after the buffer that held it;
//! - messages after it *in the same buffer* may have been applied. The controller's apply
//!   is idempotent and convergent, so the next reconcile repairs whatever that leaves
//!   (the executor additionally cuts buffers at every phase boundary of the plan, see
//!   `kernel::execute`, so no later phase ever runs after a failed earlier one).
//!
//! Every answer must fit the socket's receive buffer when the buffer is sent, or the
//! kernel drops it (an earlier test with default buffers and an ACK per message got 277
//! ACKs out of 500 messages); sized for the worst case, every message failing. The
//! socket asks for large buffers (`SO_RCVBUFFORCE`/`SO_SNDBUFFORCE`, which need
//! CAP_NET_ADMIN, as XFRM itself does; else the ordinary, capped options) and sizes each
//! buffer of messages from what it got. Answers are requested with `NETLINK_CAP_ACK`, so
//! an error does not echo the request (with its key) back. A lost answer is detected
//! (ENOBUFS) and reported, never waited for; the wait has a deadline.

mod dump;

pub(super) use dump::{DumpError, Reply, Secrets, request as dump_request};

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkSerializable};
use netlink_sys::Socket;
use tokio::io::unix::AsyncFd;
use zeroize::Zeroizing;

/// How long the answers to one buffer may take. The kernel answers while it runs
/// `send()`, so they are normally queued when we start reading; the deadline is for a
/// kernel (or a socket) that went wrong, never a normal wait.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Socket buffer size asked for (the kernel doubles it for bookkeeping).
const SOCKET_BUFFER: usize = 4 << 20;

/// Receive-buffer space budgeted per answer: each is its own small skb, and the receive
/// buffer is charged its true size (~770 bytes on 6.1), not its 36 bytes. A buffer of
/// requests is sized so that all of them could fail and their errors still fit.
const ACK_BUDGET: usize = 1024;

/// Most messages in one `send()`, even with a huge receive buffer: past a few hundred
/// the syscall is amortised already, and a smaller buffer bounds what one failure can
/// leave half-applied.
const MAX_MESSAGES: usize = 1000;

/// Fewest messages per `send()` we accept to work with (a tiny receive buffer).
const MIN_MESSAGES: usize = 16;

/// Room kept in the send buffer: the kernel refuses a datagram longer than the send
/// buffer minus 32 bytes.
const SEND_SLACK: usize = 64;

/// Largest datagram we read: answers are 36 bytes; anything else is skipped.
const RECV_BUFFER: usize = 64 << 10;

/// Netlink header layout (host byte order): length, type, flags, sequence, port.
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;

/// One request of a batch: a complete netlink message and what it means to the caller.
pub(super) struct Request {
    /// The serialized message; its sequence number is written at send time. Zeroed on
    /// drop: NEWSA messages carry keys.
    pub bytes: Zeroizing<Vec<u8>>,
    /// The caller's index for it (the change of the plan), returned in errors.
    pub tag: usize,
    /// Errnos that count as success (ENOENT for a delete of what is gone, ...).
    pub tolerated: &'static [i32],
}

/// Why a batch stopped. `tag` is the request's [`Request::tag`].
#[derive(Debug)]
pub(super) enum BatchError {
    /// The kernel refused the request with this errno (positive).
    Refused { tag: usize, errno: i32 },
    /// Sending failed: nothing of this buffer reached the kernel.
    Send { tag: usize, source: io::Error },
    /// Reading the answers failed (ENOBUFS: the kernel dropped some); `tag` is the
    /// first request of the buffer, whose fate (and its followers') is unknown.
    Receive { tag: usize, source: io::Error },
    /// The buffer that starts with this request got no final answer in time.
    Timeout { tag: usize, waited: Duration },
}

/// A netlink socket of one family, for batches of requests ([`Batch`]) and for dumps
/// ([`BatchSocket::dump`]).
pub(super) struct BatchSocket {
    fd: AsyncFd<Socket>,
    next_seq: u32,
    max_messages: usize,
    max_bytes: usize,
    /// Answers to what we sent may still be queued (an exchange that stopped early):
    /// read and dropped before the next one ([`BatchSocket::drain`]).
    unread: bool,
    /// For a view that is only shown: a dump still interrupted at its last attempt is
    /// taken as it came instead of failing, and `unsettled` records that it was.
    pub accept_unsettled: bool,
    pub unsettled: bool,
}

impl BatchSocket {
    /// Opens the socket in the current network namespace (needs a tokio runtime).
    pub fn open(protocol: isize) -> io::Result<BatchSocket> {
        let mut socket = Socket::new(protocol)?;
        socket.bind_auto()?;
        socket.set_non_blocking(true)?;
        // Errors carry only the header of the failed request, not the request itself.
        if let Err(e) = socket.set_cap_ack(true) {
            tracing::debug!(error = %e, "NETLINK_CAP_ACK not supported");
        }
        let fd = socket.as_raw_fd();
        let rcvbuf = grow_buffer(fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF)?;
        let sndbuf = grow_buffer(fd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)?;
        let max_messages = (rcvbuf / ACK_BUDGET).clamp(MIN_MESSAGES, MAX_MESSAGES);
        let max_bytes = sndbuf.saturating_sub(SEND_SLACK);
        tracing::debug!(
            protocol,
            rcvbuf,
            sndbuf,
            max_messages,
            max_bytes,
            "batch netlink socket"
        );
        // SAFETY: the `Socket` owns its descriptor and closes it only when dropped, which
        // happens with the `AsyncFd` (it is never taken out or replaced).
        let fd = unsafe { AsyncFd::register(socket)? };
        Ok(BatchSocket {
            fd,
            next_seq: 1,
            max_messages,
            max_bytes,
            unread: false,
            accept_unsettled: false,
            unsettled: false,
        })
    }

    /// A new, empty batch on this socket.
    pub fn batch(&mut self) -> Batch<'_> {
        Batch {
            socket: self,
            pending: Vec::new(),
            pending_bytes: 0,
        }
    }

    /// Reads and drops whatever is queued (answers to an earlier batch or dump that
    /// stopped early), so it does not eat the receive buffer the next batch's answers
    /// need, nor make the kernel refuse the next dump (EBUSY). Nothing to do after an
    /// exchange read to its end (a system call saved: ~20 µs inside UML).
    fn drain(&mut self) {
        if !self.unread {
            return;
        }
        self.unread = false;
        // Zeroed when dropped: the rest of an abandoned state dump holds keys.
        let mut buf = Zeroizing::new(Vec::with_capacity(RECV_BUFFER));
        loop {
            buf.clear();
            match self.fd.get_ref().recv(&mut *buf, libc::MSG_DONTWAIT) {
                Ok(_) => continue,
                // A pending overrun is reported (and cleared) by one read.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                // WouldBlock: empty; anything else is for the next send to report.
                Err(_) => break,
            }
        }
    }

    /// Sends `buf` (whole messages, sequence numbers set) in one `send()`.
    async fn send(&self, buf: &[u8]) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| fd.get_ref().send(buf, 0)) {
                Ok(Ok(n)) if n == buf.len() => return Ok(()),
                Ok(Ok(n)) => {
                    return Err(io::Error::other(format!(
                        "netlink send took {n} of {} bytes",
                        buf.len()
                    )));
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads one datagram into `buf` (cleared first).
    async fn recv(&self, buf: &mut Vec<u8>) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            buf.clear();
            match guard.try_io(|fd| fd.get_ref().recv(buf, 0)) {
                Ok(result) => return result.map(drop),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Requests waiting to be sent on one socket, in order.
pub(super) struct Batch<'s> {
    socket: &'s mut BatchSocket,
    pending: Vec<Request>,
    pending_bytes: usize,
}

impl Batch<'_> {
    /// Queues a request; sends what is queued first when the request would not fit.
    pub async fn push(&mut self, request: Request) -> Result<(), BatchError> {
        let len = aligned(request.bytes.len());
        if !self.pending.is_empty()
            && (self.pending.len() >= self.socket.max_messages
                || self.pending_bytes + len > self.socket.max_bytes)
        {
            self.flush().await?;
        }
        self.pending_bytes += len;
        self.pending.push(request);
        Ok(())
    }

    /// Sends everything queued in one `send()` and waits for the answers. See the module
    /// doc for what a failure leaves behind.
    pub async fn flush(&mut self) -> Result<(), BatchError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let requests = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let socket = &mut *self.socket;
        let started = std::time::Instant::now();
        socket.drain();

        let first_seq = socket.next_seq;
        let count = u32::try_from(requests.len()).unwrap_or(u32::MAX);
        socket.next_seq = socket.next_seq.wrapping_add(count);
        let mut buf = Zeroizing::new(Vec::with_capacity(
            requests.iter().map(|r| aligned(r.bytes.len())).sum(),
        ));
        let last = requests.len() - 1;
        for (i, r) in requests.iter().enumerate() {
            let start = buf.len();
            buf.extend_from_slice(&r.bytes);
            let seq = first_seq.wrapping_add(i as u32);
            if let Some(field) = buf.get_mut(start + 8..start + 12) {
                field.copy_from_slice(&seq.to_ne_bytes());
            }
            // Only the last message asks for an ACK; failures are answered anyway.
            if i != last
                && let Some(field) = buf.get_mut(start + 6..start + 8)
                && let Ok(bytes) = <[u8; 2]>::try_from(&*field)
            {
                let flags = u16::from_ne_bytes(bytes) & !NLM_F_ACK;
                field.copy_from_slice(&flags.to_ne_bytes());
            }
            buf.resize(start + aligned(r.bytes.len()), 0);
        }
        let first_tag = requests.first().map_or(0, |r| r.tag);
        socket.unread = true;
        socket.send(&buf).await.map_err(|source| BatchError::Send {
            tag: first_tag,
            source,
        })?;
        drop(buf);
        let sent_in = started.elapsed();

        // Errors by position; done when the last request is answered.
        let mut errors: Vec<(usize, i32)> = Vec::new();
        let last = requests.len() - 1;
        let deadline = tokio::time::Instant::now() + ACK_TIMEOUT;
        // Zeroed when dropped: without NETLINK_CAP_ACK (kernels before 4.3) an error
        // answer echoes the whole request, and an SA's key with it.
        let mut datagram = Zeroizing::new(Vec::with_capacity(RECV_BUFFER));
        let mut done = false;
        while !done {
            match tokio::time::timeout_at(deadline, socket.recv(&mut datagram)).await {
                Err(_) => {
                    return Err(BatchError::Timeout {
                        tag: first_tag,
                        waited: ACK_TIMEOUT,
                    });
                }
                Ok(Err(source)) => {
                    return Err(BatchError::Receive {
                        tag: first_tag,
                        source,
                    });
                }
                Ok(Ok(())) => {}
            }
            for (seq, errno) in acks(&datagram) {
                let index = seq.wrapping_sub(first_seq) as usize;
                if index > last {
                    continue; // an answer to an earlier batch
                }
                if errno != 0 {
                    errors.push((index, errno));
                }
                done |= index == last;
            }
        }
        socket.unread = false; // nothing can follow the last request's answer
        tracing::debug!(
            messages = requests.len(),
            send_us = sent_in.as_micros() as u64,
            total_us = started.elapsed().as_micros() as u64,
            "netlink batch acknowledged"
        );
        errors.sort_unstable();
        for (index, errno) in errors {
            let Some(request) = requests.get(index) else {
                continue;
            };
            if !request.tolerated.contains(&errno) {
                return Err(BatchError::Refused {
                    tag: request.tag,
                    errno,
                });
            }
        }
        Ok(())
    }
}

/// A complete request: `NLM_F_REQUEST | NLM_F_ACK | extra_flags`, sequence number 0
/// (set by [`Batch::flush`]). The bytes are zeroed when dropped; the caller scrubs its own
/// copy of `message` if it holds a key.
pub(super) fn encode<I: NetlinkSerializable>(
    message: &mut NetlinkMessage<I>,
    extra_flags: u16,
) -> Zeroizing<Vec<u8>> {
    message.header.flags = NLM_F_REQUEST | NLM_F_ACK | extra_flags;
    message.header.sequence_number = 0;
    message.finalize();
    let mut bytes = Zeroizing::new(vec![0; message.buffer_len()]);
    message.serialize(&mut bytes);
    bytes
}

/// Netlink messages are laid out on 4-byte boundaries.
fn aligned(len: usize) -> usize {
    len.div_ceil(4) * 4
}

/// The native-endian u32 at `at` of a netlink message, if `bytes` reaches that far.
pub(in crate::kernel) fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_ne_bytes(b))
}

/// The (sequence number, errno) of every `NLMSG_ERROR` in a datagram; other messages and
/// anything malformed are skipped.
fn acks(datagram: &[u8]) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while rest.len() >= NLMSG_HDRLEN {
        let (Some(len), Some(seq)) = (u32_at(rest, 0), u32_at(rest, 8)) else {
            break;
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            break;
        }
        let kind = rest
            .get(4..6)
            .and_then(|b| <[u8; 2]>::try_from(b).ok())
            .map(u16::from_ne_bytes);
        if kind == Some(NLMSG_ERROR)
            && let Some(code) = u32_at(rest, NLMSG_HDRLEN)
        {
            // The kernel sends -errno; 0 is the ACK.
            out.push((seq, (code as i32).saturating_abs()));
        }
        rest = rest.get(aligned(len)..).unwrap_or_default();
    }
    out
}

/// Asks for a large socket buffer: the privileged option first (not capped by
/// `net.core.[rw]mem_max`), else the ordinary one. Returns the size the kernel granted.
fn grow_buffer(fd: i32, force: libc::c_int, plain: libc::c_int) -> io::Result<usize> {
    if set_int(fd, force, SOCKET_BUFFER).is_err() {
        // Without CAP_NET_ADMIN: capped by the sysctl, still better than the default.
        let _ = set_int(fd, plain, SOCKET_BUFFER);
    }
    get_int(fd, plain)
}

fn set_int(fd: i32, option: libc::c_int, value: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    // SAFETY: `value` outlives the call and the length given is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn get_int(fd: i32, option: libc::c_int) -> io::Result<usize> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes and `len` is `value`'s size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(value).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u32_at_is_bounds_checked() {
        let bytes = 7u32.to_ne_bytes();
        assert_eq!(u32_at(&bytes, 0), Some(7));
        assert_eq!(u32_at(&bytes, 1), None);
        assert_eq!(u32_at(&bytes, usize::MAX), None);
    }

    fn message(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(aligned(m.len()), 0);
        m
    }

    fn error(seq: u32, code: i32) -> Vec<u8> {
        // nlmsgerr: error code, then the request's header (capped ACK).
        let mut payload = code.to_ne_bytes().to_vec();
        payload.extend_from_slice(&[0; NLMSG_HDRLEN]);
        message(NLMSG_ERROR, seq, &payload)
    }

    #[test]
    fn acks_reads_every_error_message() {
        let mut d = error(7, 0);
        d.extend(message(3, 8, &[1, 2, 3])); // NLMSG_DONE, odd length: padded
        d.extend(error(9, -libc::EEXIST));
        assert_eq!(acks(&d), vec![(7, 0), (9, libc::EEXIST)]);
    }

    #[test]
    fn acks_stops_at_malformed_data() {
        let mut d = error(1, 0);
        d.extend_from_slice(&[0xff; 10]); // a truncated header
        assert_eq!(acks(&d), vec![(1, 0)]);
        let mut bad_len = error(2, 0);
        bad_len[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert_eq!(acks(&bad_len), vec![]);
        assert_eq!(acks(&[]), vec![]);
    }
}
