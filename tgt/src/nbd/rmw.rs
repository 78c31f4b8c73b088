//! Byte-range I/O on a block device: reads and writes at any offset and length, with
//! read-modify-write of partial blocks, and the per-reactor buffer pool.

use bdev_core::{Descriptor, IoType};
use iobuf::IoBuf;
use nbd_proto::{self as proto, Request};

use super::range_lock::RangeLock;
/// Largest buffer the per-reactor pool keeps (larger ones are allocated per request).
const POOL_MAX_LEN: usize = 64 << 10;
/// Buffers the pool of one reactor keeps (at most 8 MiB, outside the connections' budgets).
const POOL_KEEP: usize = 128;

thread_local! {
    /// This reactor's free I/O buffers: reused for write payloads and read replies, so a
    /// connection in steady state allocates no data buffer per request.
    static BUF_POOL: std::cell::RefCell<Vec<IoBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer of `len` bytes aligned to `align`, from this reactor's pool when one fits. Its
/// bytes are not cleared: every use fills it completely (a payload received in full, a
/// device read of the whole buffer) before anything reads it.
pub(super) fn pooled_buf(len: usize, align: usize) -> IoBuf {
    let align = align.max(1).next_power_of_two();
    if len > 0 && len <= POOL_MAX_LEN {
        let hit = BUF_POOL.with(|p| {
            let mut p = p.borrow_mut();
            let i = p
                .iter()
                .rposition(|b| b.len() == len && b.align() >= align)?;
            Some(p.swap_remove(i))
        });
        if let Some(b) = hit {
            return b;
        }
    }
    IoBuf::new(len, align)
}

/// Gives a buffer back to this reactor's pool.
pub(super) fn recycle(buf: IoBuf) {
    if buf.is_empty() || buf.len() > POOL_MAX_LEN {
        return;
    }
    BUF_POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_KEEP {
            p.push(buf);
        }
    });
}

/// Block-aligned span covering a byte range: (first block, block count, byte skew in the
/// first block).
pub(super) fn span(offset: u64, len: u64, bl: u64) -> (u64, u64, usize) {
    let first = offset / bl;
    let end = (offset + len).div_ceil(bl);
    (first, end - first, (offset - first * bl) as usize)
}

/// Reads a byte range; returns the block-aligned buffer, the skew of the range in it and
/// its length.
async fn read_bytes(
    desc: &Descriptor,
    offset: u64,
    len: u64,
) -> Result<(IoBuf, usize, usize), i32> {
    let dev = desc.device();
    let bl = dev.block_len() as u64;
    let (first, count, skew) = span(offset, len, bl);
    let buf = pooled_buf((count * bl) as usize, dev.buf_align());
    let buf = desc.read_io(first, buf).await.map_err(|e| e.errno())?;
    Ok((buf, skew, len as usize))
}

/// Writes bytes at any offset: aligned spans go straight down, unaligned edges are
/// read-modify-write.
async fn write_bytes(
    desc: &Descriptor,
    rmw: &RangeLock,
    offset: u64,
    data: IoBuf,
) -> Result<(), i32> {
    let dev = desc.device();
    let bl = dev.block_len() as u64;
    let len = data.len() as u64;
    let (first, count, skew) = span(offset, len, bl);
    let whole = skew == 0 && len % bl == 0;
    // Partial blocks are read, patched and written back: nothing else may write them meanwhile.
    let _guard = rmw.lock(first, count, !whole).await;
    let buf = if whole && data.align() >= dev.buf_align() {
        data
    } else if whole {
        IoBuf::from_slice(&data, dev.buf_align())
    } else {
        let mut buf = IoBuf::new((count * bl) as usize, dev.buf_align());
        buf = desc.read(first, buf).await.map_err(|e| e.errno())?;
        buf[skew..skew + data.len()].copy_from_slice(&data);
        buf
    };
    recycle(desc.write_io(first, buf).await.map_err(|e| e.errno())?);
    Ok(())
}

async fn zero_bytes(desc: &Descriptor, rmw: &RangeLock, offset: u64, len: u64) -> Result<(), i32> {
    let dev = desc.device();
    let bl = dev.block_len() as u64;
    let a_start = offset.div_ceil(bl) * bl;
    let a_end = ((offset + len) / bl) * bl;
    if a_start >= a_end {
        return write_bytes(desc, rmw, offset, IoBuf::new(len as usize, 1)).await;
    }
    if a_start > offset {
        write_bytes(
            desc,
            rmw,
            offset,
            IoBuf::new((a_start - offset) as usize, 1),
        )
        .await?;
    }
    let guard = rmw.lock(a_start / bl, (a_end - a_start) / bl, false).await;
    if dev.io_type_supported(IoType::WriteZeroes) {
        desc.write_zeroes(a_start / bl, (a_end - a_start) / bl)
            .await
            .map_err(|e| e.errno())?;
    } else {
        const CHUNK: u64 = 1 << 20;
        let mut pos = a_start;
        while pos < a_end {
            let n = CHUNK.min(a_end - pos);
            let buf = IoBuf::new(n as usize, dev.buf_align());
            desc.write(pos / bl, buf).await.map_err(|e| e.errno())?;
            pos += n;
        }
    }
    drop(guard);
    if a_end < offset + len {
        write_bytes(
            desc,
            rmw,
            a_end,
            IoBuf::new((offset + len - a_end) as usize, 1),
        )
        .await?;
    }
    Ok(())
}

/// Runs one checked request; `Ok(Some(data))` for reads.
pub(super) async fn execute(
    desc: &Descriptor,
    rmw: &RangeLock,
    req: &Request,
    payload: Option<IoBuf>,
) -> Result<Option<(IoBuf, usize, usize)>, i32> {
    let dev = desc.device();
    let fua = req.flags & proto::CMD_FLAG_FUA != 0;
    match req.cmd {
        proto::CMD_READ => {
            if req.len == 0 {
                return Ok(Some((IoBuf::new(0, 1), 0, 0)));
            }
            read_bytes(desc, req.offset, req.len as u64).await.map(Some)
        }
        proto::CMD_WRITE => {
            if let Some(p) = payload.filter(|p| !p.is_empty()) {
                write_bytes(desc, rmw, req.offset, p).await?;
            }
            if fua && dev.io_type_supported(IoType::Flush) {
                desc.flush().await.map_err(|e| e.errno())?;
            }
            Ok(None)
        }
        proto::CMD_WRITE_ZEROES => {
            if req.len > 0 {
                zero_bytes(desc, rmw, req.offset, req.len as u64).await?;
            }
            if fua && dev.io_type_supported(IoType::Flush) {
                desc.flush().await.map_err(|e| e.errno())?;
            }
            Ok(None)
        }
        proto::CMD_TRIM => {
            // Trim is advisory: only whole blocks are unmapped.
            let bl = dev.block_len() as u64;
            let a_start = req.offset.div_ceil(bl);
            let a_end = (req.offset + req.len as u64) / bl;
            if a_end > a_start && dev.io_type_supported(IoType::Unmap) {
                let _guard = rmw.lock(a_start, a_end - a_start, false).await;
                desc.unmap(a_start, a_end - a_start)
                    .await
                    .map_err(|e| e.errno())?;
            }
            Ok(None)
        }
        proto::CMD_FLUSH => {
            if dev.io_type_supported(IoType::Flush) {
                desc.flush().await.map_err(|e| e.errno())?;
            }
            Ok(None)
        }
        _ => Err(libc::EINVAL),
    }
}
