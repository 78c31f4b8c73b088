//! One connection to the server in the transmission phase.
//!
//! A connection has two threads: a writer that sends request headers (and write payloads)
//! from a queue, batching whatever is queued into one socket write, and a reader that reads
//! simple replies, matches them to pending requests by cookie and completes each request's
//! `oneshot`. A read's payload goes straight from the socket into the caller's buffer.
//!
//! Pending requests live in a slab; the slab key is the low half of the cookie and a sequence
//! number the high half, so a stale or forged cookie is detected.
//!
//! When the connection dies (socket error, protocol violation, `kill` from the watchdog),
//! every pending request completes with [`Outcome::Lost`] and gets its buffer back, so the
//! caller can resubmit it on the next connection. A write's buffer is owned by the writer
//! thread while it is being sent; whoever of writer and reader finishes last completes it.

use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use iobuf::IoBuf;
use slab::Slab;

use crate::addr::{Address, Stream};
use crate::handshake;
use crate::{NbdError, Result};
use nbd_proto::{self as proto, Cmd, ExportInfo, Request, REPLY_LEN};

/// How a submitted request ended.
pub(crate) enum Outcome {
    /// The server answered: `Ok`, or the errno of its NBD error value. The buffer comes back.
    Done(std::result::Result<(), i32>, Option<IoBuf>),
    /// The connection died before the answer. The buffer comes back for a retry.
    Lost(Option<IoBuf>),
}

/// A request waiting for its reply.
struct Pending {
    cookie: u64,
    cmd: Cmd,
    /// The read target, or the write source once the writer has sent it.
    buf: Option<IoBuf>,
    /// The byte range of `buf` this request covers.
    buf_off: usize,
    len: usize,
    /// The writer thread holds the buffer (a write being sent).
    writer_owned: bool,
    /// The reply, when it arrived while the writer still held the buffer.
    reply: Option<std::result::Result<(), i32>>,
    /// The connection died while the writer held the buffer.
    lost: bool,
    tx: oneshot::Sender<Outcome>,
    since: Instant,
}

#[derive(Default)]
struct Table {
    slab: Slab<Pending>,
    dead: bool,
    seq: u32,
}

impl Table {
    /// Marks the connection dead and takes the pending requests it can fail now (`None` when
    /// it already was). A request the writer still owns is only marked lost: the writer
    /// gives it back when it is done with its buffer.
    fn mark_dead(&mut self) -> Option<Vec<Pending>> {
        if self.dead {
            return None;
        }
        self.dead = true;
        let mut keys = Vec::new();
        for (k, p) in self.slab.iter_mut() {
            if p.writer_owned {
                p.lost = true;
            } else {
                keys.push(k);
            }
        }
        Some(keys.into_iter().map(|k| self.slab.remove(k)).collect())
    }
}

/// Work for the writer thread.
enum Job {
    /// Send a request header, and the payload range of a write.
    Send {
        key: usize,
        cookie: u64,
        header: [u8; proto::REQUEST_LEN],
        data: Option<IoBuf>,
        off: usize,
        len: usize,
    },
    /// Send `NBD_CMD_DISC`, then stop.
    Disconnect,
    /// Stop.
    Stop,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connection in the transmission phase.
pub(crate) struct Conn {
    /// The socket, kept to shut it down (reader and writer use clones of it).
    stream: Stream,
    table: Mutex<Table>,
    jobs: mpsc::Sender<Job>,
    info: ExportInfo,
    /// Told (outside any lock) when the connection dies.
    on_dead: Box<dyn Fn() + Send + Sync>,
    /// For log messages.
    label: String,
}

impl Conn {
    /// Connects, runs the handshake (bounded by `timeout`) and starts the two threads.
    pub(crate) fn open(
        addr: &Address,
        export: &str,
        timeout: Duration,
        label: &str,
        on_dead: Box<dyn Fn() + Send + Sync>,
    ) -> Result<Arc<Conn>> {
        let mut s = addr.connect(timeout).map_err(|source| NbdError::Connect {
            address: addr.to_string(),
            source,
        })?;
        s.set_timeouts(Some(timeout)).map_err(NbdError::Socket)?;
        let info = handshake::handshake(&mut s, export)?;
        // From now on the watchdog bounds requests; an idle connection must not time out,
        // but one whose peer vanished must be noticed.
        s.set_timeouts(None).map_err(NbdError::Socket)?;
        if let Err(e) = s.set_keepalive(timeout) {
            tracing::warn!(target: "bdev_nbd", conn = %label, "no tcp keepalive: {e}");
        }
        let rd = s.try_clone().map_err(NbdError::Socket)?;
        let wr = s.try_clone().map_err(NbdError::Socket)?;
        let (tx, rx) = mpsc::channel();
        let conn = Arc::new(Conn {
            stream: s,
            table: Mutex::new(Table::default()),
            jobs: tx,
            info,
            on_dead,
            label: label.to_string(),
        });
        let c = conn.clone();
        std::thread::Builder::new()
            .name(format!("nbd-wr-{label}"))
            .spawn(move || c.writer(wr, rx))
            .map_err(NbdError::Socket)?;
        let c = conn.clone();
        if let Err(e) = std::thread::Builder::new()
            .name(format!("nbd-rd-{label}"))
            .spawn(move || c.reader(rd))
        {
            conn.kill("cannot start the reader thread");
            return Err(NbdError::Socket(e));
        }
        Ok(conn)
    }

    /// What the server said about the export.
    pub(crate) fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Whether the connection has died.
    pub(crate) fn is_dead(&self) -> bool {
        lock(&self.table).dead
    }

    /// When the oldest pending request was submitted.
    pub(crate) fn oldest(&self) -> Option<Instant> {
        lock(&self.table).slab.iter().map(|(_, p)| p.since).min()
    }

    /// Queues a request. `buf` is the read target or the write source (with the byte range
    /// `buf_off..buf_off + len` of it used); other commands pass `None`. On a dead connection
    /// the buffer comes straight back as [`Outcome::Lost`].
    pub(crate) fn submit(
        &self,
        cmd: Cmd,
        offset: u64,
        len: u32,
        buf: Option<IoBuf>,
        buf_off: usize,
    ) -> std::result::Result<oneshot::Receiver<Outcome>, Outcome> {
        let mut t = lock(&self.table);
        if t.dead {
            return Err(Outcome::Lost(buf));
        }
        let (tx, rx) = oneshot::channel();
        t.seq = t.seq.wrapping_add(1);
        let seq = t.seq;
        let entry = t.slab.vacant_entry();
        let key = entry.key();
        let cookie = (u64::from(seq) << 32) | (key as u64 & 0xffff_ffff);
        let is_write = cmd == Cmd::Write;
        let (kept, sent) = if is_write { (None, buf) } else { (buf, None) };
        entry.insert(Pending {
            cookie,
            cmd,
            buf: kept,
            buf_off,
            len: len as usize,
            writer_owned: is_write,
            reply: None,
            lost: false,
            tx,
            since: Instant::now(),
        });
        // Sent under the lock, so that a `kill` (which takes the lock, then queues `Stop`)
        // always finds the job ahead of `Stop` in the queue.
        let job = Job::Send {
            key,
            cookie,
            header: proto::encode_request(&Request::new(cmd, cookie, offset, len)),
            data: sent,
            off: buf_off,
            len: len as usize,
        };
        if let Err(mpsc::SendError(job)) = self.jobs.send(job) {
            // The writer is gone, so the connection is dead: give everything back.
            let p = t.slab.remove(key);
            let data = match job {
                Job::Send { data, .. } => data,
                Job::Disconnect | Job::Stop => None,
            };
            drop(t);
            self.kill("writer thread gone");
            return Err(Outcome::Lost(p.buf.or(data)));
        }
        Ok(rx)
    }

    /// Declares the connection dead: fails every pending request with `Lost`, shuts the
    /// socket down and tells the owner. Idempotent.
    pub(crate) fn kill(&self, why: &str) {
        let lost = {
            let mut t = lock(&self.table);
            let Some(lost) = t.mark_dead() else {
                return;
            };
            let _ = self.jobs.send(Job::Stop);
            lost
        };
        tracing::warn!(target: "bdev_nbd", conn = %self.label, pending = lost.len(),
            "connection lost: {why}");
        for p in lost {
            let _ = p.tx.send(Outcome::Lost(p.buf));
        }
        self.stream.shutdown();
        (self.on_dead)();
    }

    /// Ends the connection politely (`NBD_CMD_DISC`); pending requests are lost.
    pub(crate) fn close(&self) {
        let lost = {
            let mut t = lock(&self.table);
            let Some(lost) = t.mark_dead() else {
                return;
            };
            // Never let a stuck peer hold the writer: the disconnect is best effort.
            let _ = self.stream.set_timeouts(Some(Duration::from_secs(1)));
            let _ = self.jobs.send(Job::Disconnect);
            lost
        };
        for p in lost {
            let _ = p.tx.send(Outcome::Lost(p.buf));
        }
    }

    /// The writer is done with a write's buffer.
    fn writer_done(&self, key: usize, cookie: u64, buf: Option<IoBuf>) {
        let mut t = lock(&self.table);
        let dead = t.dead;
        let Some(p) = t.slab.get_mut(key).filter(|p| p.cookie == cookie) else {
            return;
        };
        if p.lost || dead {
            let p = t.slab.remove(key);
            drop(t);
            let _ = p.tx.send(Outcome::Lost(buf));
        } else if let Some(r) = p.reply.take() {
            let p = t.slab.remove(key);
            drop(t);
            let _ = p.tx.send(Outcome::Done(r, buf));
        } else {
            p.buf = buf;
            p.writer_owned = false;
        }
    }

    fn writer(self: Arc<Self>, stream: Stream, rx: mpsc::Receiver<Job>) {
        let mut w = BufWriter::with_capacity(256 * 1024, stream);
        let mut failed = false;
        let mut next = rx.recv();
        loop {
            let job = match next {
                Ok(j) => j,
                Err(_) => break,
            };
            match job {
                Job::Send {
                    key,
                    cookie,
                    header,
                    data,
                    off,
                    len,
                } => {
                    if !failed && !self.is_dead() {
                        let mut r = w.write_all(&header);
                        if let (Ok(()), Some(d)) = (&r, &data) {
                            r = w.write_all(&d[off..off + len]);
                        }
                        if let Err(e) = r {
                            failed = true;
                            self.kill(&format!("write failed: {e}"));
                        }
                    }
                    if data.is_some() {
                        self.writer_done(key, cookie, data);
                    }
                }
                Job::Disconnect => {
                    let disc = proto::encode_request(&Request::new(Cmd::Disc, 0, 0, 0));
                    if !failed {
                        let _ = w.write_all(&disc);
                        let _ = w.flush();
                    }
                    self.stream.shutdown();
                    break;
                }
                Job::Stop => break,
            }
            next = match rx.try_recv() {
                Ok(j) => Ok(j),
                Err(TryRecvError::Empty) => {
                    if !failed {
                        if let Err(e) = w.flush() {
                            failed = true;
                            self.kill(&format!("write failed: {e}"));
                        }
                    }
                    rx.recv()
                }
                Err(TryRecvError::Disconnected) => break,
            };
        }
        // Jobs still queued after `Stop` hold write buffers of requests already marked
        // lost: hand them back.
        while let Ok(job) = rx.try_recv() {
            if let Job::Send {
                key,
                cookie,
                data: Some(d),
                ..
            } = job
            {
                self.writer_done(key, cookie, Some(d));
            }
        }
    }

    fn reader(self: Arc<Self>, stream: Stream) {
        let mut r = BufReader::with_capacity(128 * 1024, stream);
        let why = loop {
            let mut hdr = [0u8; REPLY_LEN];
            if let Err(e) = r.read_exact(&mut hdr) {
                break format!("read failed: {e}");
            }
            let reply = match proto::parse_reply(&hdr) {
                Ok(rep) => rep,
                Err(e) => break e.to_string(),
            };
            if reply.error == proto::ESHUTDOWN {
                // The server is going away; the request is resubmitted after reconnecting.
                break "server is shutting down".to_string();
            }
            let key = (reply.cookie & 0xffff_ffff) as usize;
            let mut t = lock(&self.table);
            let known = t
                .slab
                .get(key)
                .is_some_and(|p| p.cookie == reply.cookie && p.reply.is_none() && !p.lost);
            if !known {
                break format!("reply with unknown cookie {:#x}", reply.cookie);
            }
            let result = if reply.error == 0 {
                Ok(())
            } else {
                Err(proto::nbd_to_errno(reply.error))
            };
            let Some(p) = t.slab.get_mut(key) else {
                break "pending request vanished".to_string();
            };
            if p.cmd == Cmd::Write && p.writer_owned {
                p.reply = Some(result);
                continue;
            }
            let mut p = t.slab.remove(key);
            drop(t);
            if p.cmd == Cmd::Read && result.is_ok() {
                let Some(mut buf) = p.buf.take() else {
                    let _ = p.tx.send(Outcome::Lost(None));
                    break "read without a buffer".to_string();
                };
                let range = p.buf_off..p.buf_off + p.len;
                if let Err(e) = r.read_exact(&mut buf[range]) {
                    let _ = p.tx.send(Outcome::Lost(Some(buf)));
                    break format!("read of payload failed: {e}");
                }
                let _ = p.tx.send(Outcome::Done(Ok(()), Some(buf)));
            } else {
                let _ = p.tx.send(Outcome::Done(result, p.buf));
            }
        };
        self.kill(&why);
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.stream.shutdown();
    }
}
