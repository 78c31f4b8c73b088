//! One connection's session: the handshake, then the transmission loop (requests read,
//! run, answered).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use iobuf::IoBuf;
use nbd_proto::{self as proto, Next, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::exports::{Export, ExportMap, Lookup};
use super::rmw::{execute, pooled_buf, recycle, span};
use super::server::lock;
use super::slots::Slots;
use crate::limits::{Held, MemBudget, StallGuard};
/// Receive buffer of a connection.
pub(super) const RBUF_LEN: usize = 256 << 10;

/// Requests one connection may have in flight at once.
const MAX_INFLIGHT: usize = 128;

fn proto_err(e: proto::ProtoError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

/// Decrements the export's connection count when the transmission phase ends.
struct ConnCount(Arc<Export>);

impl Drop for ConnCount {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Longest a client may take over its handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The newstyle fixed handshake: options until one selects an export (returned) or the client
/// aborts (`None`).
async fn handshake<R, W>(
    rd: &mut R,
    wr: &mut W,
    exports: &ExportMap,
) -> std::io::Result<Option<Arc<Export>>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    wr.write_all(&proto::greeting()).await?;
    let mut flags = [0u8; 4];
    rd.read_exact(&mut flags).await?;
    let no_zeroes = proto::parse_client_flags(&flags).map_err(proto_err)?;
    loop {
        let mut hdr = [0u8; 16];
        rd.read_exact(&mut hdr).await?;
        let h = proto::parse_option_header(&hdr).map_err(proto_err)?;
        let mut data = vec![0u8; h.len as usize];
        rd.read_exact(&mut data).await?;
        let out = proto::handle_option(h.option, &data, no_zeroes, &Lookup(exports));
        wr.write_all(&out.reply).await?;
        match out.next {
            Next::Continue => {}
            Next::Close => {
                wr.shutdown().await.ok();
                return Ok(None);
            }
            Next::Transmit(name) => return Ok(lock(exports).get(&name).cloned()),
        }
    }
}

pub(super) async fn serve<S>(
    stream: S,
    exports: ExportMap,
    mem: ConnMem,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rd, mut wr) = tokio::io::split(stream);
    // Small: it only serves the handshake; larger reads bypass it.
    let mut rd = tokio::io::BufReader::with_capacity(4096, rd);
    // The handshake gives up on shutdown and on clients that stall for a minute.
    let export = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut rd, &mut wr, &exports)) => match r {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        },
        _ = wait_true(&mut stop) => return Ok(()),
    };
    let Some(export) = export else {
        return Ok(());
    };
    export.connections.fetch_add(1, Ordering::SeqCst);
    let _count = ConnCount(export.clone());
    let mut cancel = export.cancel.subscribe();
    let (mut cancel2, mut stop2) = (export.cancel.subscribe(), stop.clone());
    let t = transmission(&mut rd, wr, &export, &mem, &mut cancel, &mut stop);
    // A client that stops reading its replies must not hold the export (and so a bdev
    // removal) forever: once the connection is told to close, it gets a grace period.
    let grace = async {
        tokio::select! {
            _ = wait_true(&mut cancel2) => {},
            _ = wait_true(&mut stop2) => {},
        }
        tokio::time::sleep(CLOSE_GRACE).await;
    };
    tokio::select! {
        r = t => r,
        _ = grace => {
            tracing::warn!("nbd export {}: connection did not drain in time; dropped", export.name);
            Ok(())
        }
    }
}

/// How long a closing connection may take to finish its requests and send the replies.
#[cfg(not(test))]
pub(super) const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);
#[cfg(test)]
pub(super) const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_millis(300);

/// Fixed memory charged per connection for its send side (replies are written from their
/// own buffers, see `put_all`; the charge keeps the per-connection budget as it was).
pub(super) const WBUF_LEN: usize = 256 << 10;

/// The memory a connection may use: its own budget, the server-wide one, and the stall
/// timeout.
#[derive(Clone)]
pub(super) struct ConnMem {
    pub(super) conn: Arc<MemBudget>,
    pub(super) global: Arc<MemBudget>,
    pub(super) stall: Duration,
}

/// Bytes charged to both budgets until a request's reply was written.
type Charge = (Held, Held);

impl ConnMem {
    /// A request's charge, bounded so that it always fits an empty budget.
    fn bound(&self, n: usize) -> usize {
        n.min(self.conn.limit()).min(self.global.limit())
    }
    fn try_charge(&self, n: usize) -> Option<Charge> {
        let n = self.bound(n);
        let a = Held::try_take(&self.conn, n)?;
        let b = Held::try_take(&self.global, n)?;
        Some((a, b))
    }
    fn charge(&self, n: usize) -> futures::future::BoxFuture<'static, Charge> {
        let (conn, global, n) = (self.conn.clone(), self.global.clone(), self.bound(n));
        Box::pin(async move {
            // Dropped half-way, the first part is given back with `a`.
            let a = Held::take(&conn, n).await;
            let b = Held::take(&global, n).await;
            (a, b)
        })
    }
}

/// The memory a request pins until its reply is written: the payload of a write, the reply
/// buffer of a read (block-aligned), a bounded scratch buffer for write zeroes.
fn request_bytes(req: &Request, bl: u64) -> usize {
    let (_, count, _) = span(req.offset, req.len as u64, bl);
    let bytes = count.saturating_mul(bl);
    match req.cmd {
        proto::CMD_READ | proto::CMD_WRITE => bytes as usize,
        proto::CMD_WRITE_ZEROES => bytes.min((1 << 20) + 2 * bl) as usize,
        _ => 0,
    }
}

/// A request whose payload is still arriving.
struct Pending {
    req: Request,
    buf: IoBuf,
    filled: usize,
    charge: Charge,
}

/// A checked and charged request ready to run, with its payload if it has one.
type Ready = (Request, Option<IoBuf>, Charge);

/// Runs one checked request; the future yields its reply, which keeps the charge of a read
/// until it was written. It borrows the export (the connection's requests all end before the
/// connection does), and every request's future has this one type, so the connection keeps
/// them in place (no box, no reference count per request).
async fn start_request(export: &Export, (req, payload, charge): Ready) -> Reply {
    match execute(&export.desc, &export.rmw, &req, payload).await {
        Ok(None) => Reply::Simple(proto::simple_reply(0, req.cookie)),
        Ok(Some((buf, skew, len))) => {
            Reply::Data(proto::simple_reply(0, req.cookie), buf, skew, len, charge)
        }
        Err(errno) => Reply::Simple(proto::simple_reply(proto::errno_to_nbd(errno), req.cookie)),
    }
}

/// A checked and charged request: ready at once, or once its payload arrived (`pending`;
/// the part already received is taken from `rbuf[*pos..]`).
fn begin(
    export: &Export,
    req: Request,
    charge: Charge,
    rbuf: &[u8],
    pos: &mut usize,
    pending: &mut Option<Pending>,
) -> Option<Ready> {
    if !proto::has_payload(&req) {
        return Some((req, None, charge));
    }
    let len = req.len as usize;
    let mut buf = pooled_buf(len, export.desc.device().buf_align());
    let have = (rbuf.len() - *pos).min(len);
    buf[..have].copy_from_slice(&rbuf[*pos..*pos + have]);
    *pos += have;
    if have == len {
        return Some((req, Some(buf), charge));
    }
    *pending = Some(Pending {
        req,
        buf,
        filled: have,
        charge,
    });
    None
}

/// The transmission phase. One task reads requests, runs up to [`MAX_INFLIGHT`] of them
/// concurrently (in reusable slots, [`Slots`]: no task and no allocation per request) and writes each reply as soon as
/// it is ready, batching the replies that are ready together into one flush. When the client
/// disconnects, the export goes away or the server stops, no new request is read; the ones in
/// flight complete and their replies are sent before the socket is closed.
///
/// Memory: every payload and read reply is charged to the connection's and the server's
/// budget before it is allocated and given back when the reply was written. Without budget
/// the connection stops reading requests (its replies still go out); a client that reads
/// none of its replies, or announces a payload and does not send it, for the stall timeout
/// is dropped. A write over [`proto::MAX_PAYLOAD`] is answered `EOVERFLOW` and its payload
/// read and thrown away.
async fn transmission<R, W>(
    rd: &mut R,
    wr: W,
    export: &Arc<Export>,
    mem: &ConnMem,
    cancel: &mut watch::Receiver<bool>,
    stop: &mut watch::Receiver<bool>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // The fixed buffers count against the server's budget too.
    let Ok(_fixed) =
        tokio::time::timeout(mem.stall, Held::take(&mem.global, RBUF_LEN + WBUF_LEN)).await
    else {
        tracing::warn!(
            "nbd export {}: no memory for a new connection; closed",
            export.name
        );
        return Ok(());
    };
    // Replies are gathered into `writev` calls straight from their buffers (`put_all`), so
    // no buffered writer (whose buffer they would be copied into).
    let mut w = StallGuard::new(wr, mem.stall);
    let mut ready: Vec<Reply> = Vec::with_capacity(MAX_INFLIGHT);
    let mut inflight = Slots::with_capacity(MAX_INFLIGHT);
    // Received bytes not yet parsed are rbuf[pos..].
    let mut rbuf: Vec<u8> = Vec::with_capacity(RBUF_LEN);
    let mut pos = 0usize;
    let mut pending: Option<Pending> = None;
    // A checked request waiting for budget.
    let mut waiting: Option<(Request, futures::future::BoxFuture<'static, Charge>)> = None;
    // Payload bytes of a refused write still to be skipped.
    let mut discard: u64 = 0;
    let mut last_payload_byte = tokio::time::Instant::now();
    let bl = export.desc.device().block_len() as u64;
    let mut closing = *cancel.borrow() || *stop.borrow();
    // The export's removal or the server's stop, awaited by one future for the whole
    // session (a fresh pair of watch waiters per pass of the loop would cost every request).
    let close = async {
        tokio::select! {
            _ = wait_true(cancel) => {},
            _ = wait_true(stop) => {},
        }
    };
    tokio::pin!(close);
    loop {
        // Take every complete request out of the receive buffer.
        while !closing && pending.is_none() && waiting.is_none() && inflight.len() < MAX_INFLIGHT {
            if discard > 0 {
                let k = (discard as usize).min(rbuf.len() - pos);
                pos += k;
                discard -= k as u64;
                if discard > 0 {
                    break;
                }
            }
            if rbuf.len() - pos < proto::REQUEST_LEN {
                break;
            }
            let mut hdr = [0u8; proto::REQUEST_LEN];
            hdr.copy_from_slice(&rbuf[pos..pos + proto::REQUEST_LEN]);
            let Ok(req) = proto::parse_request(&hdr) else {
                closing = true;
                break;
            };
            if req.cmd == proto::CMD_DISC {
                closing = true;
                break;
            }
            pos += proto::REQUEST_LEN;
            let dev = export.desc.device();
            let size = dev.num_blocks() * dev.block_len() as u64;
            if let Err(e) = proto::check_request(&req, size, !export.writable) {
                // Refused: the payload of a write is skipped, not buffered.
                if proto::has_payload(&req) {
                    discard = req.len as u64;
                    last_payload_byte = tokio::time::Instant::now();
                }
                Reply::Simple(proto::simple_reply(e, req.cookie))
                    .put(&mut w)
                    .await?;
                continue;
            }
            let n = request_bytes(&req, bl);
            match mem.try_charge(n) {
                Some(c) => {
                    if let Some(r) = begin(export, req, c, &rbuf, &mut pos, &mut pending) {
                        inflight.push(start_request(export, r));
                    } else if pending.is_some() {
                        last_payload_byte = tokio::time::Instant::now();
                    }
                }
                None => waiting = Some((req, mem.charge(n))),
            }
        }
        // Keep the unparsed tail at the front, with room to read into.
        if pos == rbuf.len() {
            rbuf.clear();
            pos = 0;
        } else if pos > 0 && rbuf.capacity() - rbuf.len() < RBUF_LEN / 4 {
            rbuf.drain(..pos);
            pos = 0;
        }
        if rbuf.capacity() - rbuf.len() < RBUF_LEN / 4 {
            rbuf.reserve(RBUF_LEN / 4);
        }
        if closing && inflight.is_empty() {
            break;
        }
        let want_read = !closing && waiting.is_none() && inflight.len() < MAX_INFLIGHT;
        let payload_due = pending.is_some() || discard > 0;
        tokio::select! {
            biased;
            Some(reply) = inflight.next(), if !inflight.is_empty() => {
                ready.push(reply);
                while let Some(Some(reply)) = inflight.next().now_or_never() {
                    ready.push(reply);
                }
                put_all(&mut w, &mut ready).await?;
                // Nothing was read while the replies went out: that time is ours, not a
                // stall of the client's payload.
                if pending.is_some() || discard > 0 {
                    last_payload_byte = tokio::time::Instant::now();
                }
            }
            c = async { match waiting.as_mut() { Some((_, f)) => f.await, None => futures::future::pending().await } }, if waiting.is_some() && !closing => {
                if let Some((req, _)) = waiting.take() {
                    if let Some(r) = begin(export, req, c, &rbuf, &mut pos, &mut pending) {
                        inflight.push(start_request(export, r));
                    } else if pending.is_some() {
                        last_payload_byte = tokio::time::Instant::now();
                    }
                }
            }
            n = read_some(rd, &mut pending, &mut rbuf), if want_read => match n {
                Ok(0) | Err(_) => closing = true,
                Ok(n) => {
                    // The stall clock runs only while a payload is due (a new one starts
                    // its own clock in `begin`'s caller): no clock read per request.
                    if payload_due {
                        last_payload_byte = tokio::time::Instant::now();
                    }
                    if let Some(p) = pending.as_mut() {
                        p.filled += n;
                        if p.filled == p.buf.len() {
                            if let Some(p) = pending.take() {
                                inflight.push(start_request(export, (p.req, Some(p.buf), p.charge)));
                            }
                        }
                    }
                }
            },
            // An async block: the timer is made only when the branch is polled.
            _ = async { tokio::time::sleep_until(last_payload_byte + mem.stall).await }, if payload_due && !closing => {
                tracing::warn!("nbd export {}: client sent no payload byte for {:?}; dropped", export.name, mem.stall);
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "payload stalled"));
            }
            // Polled only until it completes: then `closing` is set for good.
            _ = &mut close, if !closing => closing = true,
        }
    }
    w.flush().await?;
    let _ = w.shutdown().await;
    Ok(())
}

/// Reads into the pending payload if there is one (no copy), else appends to `rbuf`.
async fn read_some<R: AsyncRead + Unpin>(
    rd: &mut R,
    pending: &mut Option<Pending>,
    rbuf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    match pending {
        Some(p) => {
            let filled = p.filled;
            rd.read(&mut p.buf[filled..]).await
        }
        None => rd.read_buf(rbuf).await,
    }
}

/// Waits until the watched flag is true (forever if its sender is gone).
async fn wait_true(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            futures::future::pending::<()>().await;
        }
    }
}

/// A reply on its way to the socket.
enum Reply {
    /// A reply header alone.
    Simple([u8; 16]),
    /// A read reply: header, then `len` bytes of the buffer from `skew`; the charge is
    /// given back once written.
    Data([u8; 16], IoBuf, usize, usize, Charge),
}

impl Reply {
    /// Writes this reply alone (see [`put_all`]).
    async fn put<W: AsyncWrite + Unpin>(self, w: &mut W) -> std::io::Result<()> {
        put_all(w, &mut vec![self]).await
    }

    /// The reply's bytes: its header, and for a read reply the data, straight from the
    /// buffer the device read into.
    fn parts(&self) -> [&[u8]; 2] {
        match self {
            Reply::Simple(h) => [h, &[]],
            Reply::Data(h, buf, skew, len, _) => [h, &buf[*skew..*skew + *len]],
        }
    }
}

/// Iovecs of one `writev` of replies (Linux's `IOV_MAX` is 1024).
const REPLY_IOVS: usize = 64;

/// Writes `replies` in order and empties it, giving their buffers back to the pool: every
/// header and read buffer goes to the socket as is, gathered in `writev` calls of up to
/// [`REPLY_IOVS`] pieces (one call for a whole batch of 4 KiB read replies at depth 32), so
/// no reply byte is copied on its way out.
async fn put_all<W: AsyncWrite + Unpin>(
    w: &mut W,
    replies: &mut Vec<Reply>,
) -> std::io::Result<()> {
    // Bytes of the batch already written.
    let mut done = 0usize;
    loop {
        let mut iov = [std::io::IoSlice::new(&[]); REPLY_IOVS];
        let mut n = 0;
        let mut skip = done;
        'fill: for r in replies.iter() {
            for part in r.parts() {
                if part.is_empty() {
                    continue;
                }
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                iov[n] = std::io::IoSlice::new(&part[skip..]);
                skip = 0;
                n += 1;
                if n == REPLY_IOVS {
                    break 'fill;
                }
            }
        }
        if n == 0 {
            break;
        }
        let k = w.write_vectored(&iov[..n]).await?;
        if k == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        done += k;
    }
    for r in replies.drain(..) {
        if let Reply::Data(_, buf, _, _, charge) = r {
            recycle(buf);
            // The reply's memory is back with the connection and the server.
            drop(charge);
        }
    }
    Ok(())
}
