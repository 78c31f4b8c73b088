//! Error-injection bdev (SPDK `bdev_error`), plus power-loss simulation.
//!
//! An [`ErrorBdev`] forwards every call to a base [`Descriptor`] and applies injection rules
//! first. A rule matches an I/O by type and block range; it lets `after` matching I/Os through
//! unharmed, then affects the next `count` ones: [`ErrorKind::Failure`] fails them with EIO,
//! [`ErrorKind::DropWrites`] acknowledges writes (and unmap / write_zeroes) without passing
//! them to the base, as if power had been lost before they reached the media.
//!
//! Module `"error"`, product `"Error disk"`, default name `EE_<base>`, and `write_config`
//! gives SPDK's `bdev_error_create {"base_name"}` entry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use iobuf::IoBuf;
use uuid::Uuid;

use crate::{BdevError, BlockDevice, Descriptor, IoType, Result};

/// What an injected error does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The I/O fails with EIO.
    Failure,
    /// Writes are acknowledged but not written (power loss: everything after the trigger is lost).
    DropWrites,
}

/// One injection rule.
#[derive(Clone, Debug)]
pub struct Injection {
    /// I/O type it applies to (`None` = all).
    pub io_type: Option<IoType>,
    /// What happens.
    pub kind: ErrorKind,
    /// Only I/O touching this block range (start, count) is affected (`None` = all).
    pub range: Option<(u64, u64)>,
    /// Start after this many matching I/Os went through unharmed.
    pub after: u64,
    /// Affect this many I/Os (`u64::MAX` = forever).
    pub count: u64,
}

impl Injection {
    /// A rule failing every I/O of `io_type` (all types for `None`) with EIO, forever.
    pub fn fail(io_type: Option<IoType>) -> Self {
        Injection {
            io_type,
            kind: ErrorKind::Failure,
            range: None,
            after: 0,
            count: u64::MAX,
        }
    }

    /// A rule dropping every write after the first `after` ones (power loss).
    pub fn drop_writes_after(after: u64) -> Self {
        Injection {
            io_type: None,
            kind: ErrorKind::DropWrites,
            range: None,
            after,
            count: u64::MAX,
        }
    }
}

struct Rule {
    inj: Injection,
    /// Matching I/Os seen so far.
    seen: u64,
    /// I/Os affected so far.
    hit: u64,
    /// Errno reported on failure (EIO, or ENOMEM for SPDK's "nomem").
    errno: i32,
}

/// What the rules decided for one I/O.
enum Verdict {
    Pass,
    Fail(i32),
    Drop,
}

/// A bdev that forwards to a base descriptor and injects errors. Name `EE_<base>` by default.
pub struct ErrorBdev {
    name: String,
    uuid: Uuid,
    base: Descriptor,
    rules: Mutex<Vec<Rule>>,
    writes_seen: AtomicU64,
}

fn is_write_like(t: IoType) -> bool {
    matches!(t, IoType::Write | IoType::Unmap | IoType::WriteZeroes)
}

impl ErrorBdev {
    /// Wraps an open (writable) descriptor of the base. An empty `name` means `EE_<base>`.
    /// A writable base descriptor is claimed `ExclusiveWrite` (as SPDK's error vbdev does), so
    /// creation fails with EPERM if the base is already claimed.
    pub fn create(name: &str, base: Descriptor) -> Result<Arc<Self>> {
        if base.is_writable() && base.claim_type().is_none() {
            base.claim(crate::ClaimType::ExclusiveWrite)?;
        }
        let name = if name.is_empty() {
            format!("EE_{}", base.name())
        } else {
            name.to_string()
        };
        Ok(Arc::new(ErrorBdev {
            name,
            uuid: Uuid::new_v4(),
            base,
            rules: Mutex::new(Vec::new()),
            writes_seen: AtomicU64::new(0),
        }))
    }

    /// The base descriptor.
    pub fn base(&self) -> &Descriptor {
        &self.base
    }

    /// Adds an injection rule.
    pub fn inject(&self, injection: Injection) {
        self.add_rule(injection, libc::EIO);
    }

    fn add_rule(&self, inj: Injection, errno: i32) {
        self.rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Rule {
                inj,
                seen: 0,
                hit: 0,
                errno,
            });
    }

    /// SPDK's `bdev_error_inject_error`: `io_type` is `"read"`, `"write"`, `"unmap"`,
    /// `"flush"`, `"reset"`, `"write_zeroes"` or `"all"`; `error_type` is `"failure"`,
    /// `"pending"`, `"corrupt_data"` or `"nomem"`; `num` I/Os are affected (0 means 1, as in
    /// SPDK).
    ///
    /// Mapping: `failure`, `pending` and `corrupt_data` fail the I/O with EIO (we neither hold
    /// I/Os forever nor corrupt data); `nomem` fails it with ENOMEM. An unknown string is
    /// EINVAL.
    pub fn inject_spdk(&self, io_type: &str, error_type: &str, num: u64) -> Result<()> {
        let t = match io_type {
            "all" => None,
            "read" => Some(IoType::Read),
            "write" => Some(IoType::Write),
            "unmap" => Some(IoType::Unmap),
            "flush" => Some(IoType::Flush),
            "reset" => Some(IoType::Reset),
            "write_zeroes" => Some(IoType::WriteZeroes),
            other => {
                return Err(BdevError::InvalidArgument(format!(
                    "unsupported io_type {other}"
                )))
            }
        };
        let errno = match error_type {
            "failure" | "pending" | "corrupt_data" => libc::EIO,
            "nomem" => libc::ENOMEM,
            other => {
                return Err(BdevError::InvalidArgument(format!(
                    "unsupported error_type {other}"
                )))
            }
        };
        let inj = Injection {
            io_type: t,
            kind: ErrorKind::Failure,
            range: None,
            after: 0,
            count: num.max(1),
        };
        self.add_rule(inj, errno);
        Ok(())
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.rules.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Number of writes that reached the base so far.
    pub fn writes_seen(&self) -> u64 {
        self.writes_seen.load(Ordering::Acquire)
    }

    fn judge(&self, io_type: IoType, offset: u64, num_blocks: u64) -> Verdict {
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        for r in rules.iter_mut() {
            if let Some(t) = r.inj.io_type {
                if t != io_type {
                    continue;
                }
            }
            if r.inj.kind == ErrorKind::DropWrites && !is_write_like(io_type) {
                continue;
            }
            if let Some((start, count)) = r.inj.range {
                let end = start.saturating_add(count);
                let io_end = offset.saturating_add(num_blocks.max(1));
                if offset >= end || io_end <= start {
                    continue;
                }
            }
            r.seen += 1;
            if r.seen <= r.inj.after || r.hit >= r.inj.count {
                continue;
            }
            r.hit += 1;
            return match r.inj.kind {
                ErrorKind::Failure => Verdict::Fail(r.errno),
                ErrorKind::DropWrites => Verdict::Drop,
            };
        }
        Verdict::Pass
    }

    fn blocks(&self, len: usize) -> u64 {
        (len / self.base.block_len() as usize) as u64
    }
}

fn fail(errno: i32) -> BdevError {
    BdevError::Io(std::io::Error::from_raw_os_error(errno))
}

#[async_trait]
impl BlockDevice for ErrorBdev {
    crate::device_facts!(product: "Error disk", module: "error", base: base);
    fn buf_align(&self) -> usize {
        self.base.device().buf_align()
    }
    fn optimal_io_boundary(&self) -> u32 {
        self.base.device().optimal_io_boundary()
    }
    fn io_type_supported(&self, io_type: IoType) -> bool {
        self.base.device().io_type_supported(io_type)
    }
    fn has_volatile_cache(&self) -> bool {
        self.base.device().has_volatile_cache()
    }
    fn unmap_zeroes(&self) -> bool {
        self.base.device().unmap_zeroes()
    }
    async fn read(&self, offset_blocks: u64, buf: IoBuf) -> Result<IoBuf> {
        match self.judge(IoType::Read, offset_blocks, self.blocks(buf.len())) {
            Verdict::Fail(e) => Err(fail(e)),
            _ => self.base.read(offset_blocks, buf).await,
        }
    }
    async fn write(&self, offset_blocks: u64, buf: IoBuf) -> Result<IoBuf> {
        match self.judge(IoType::Write, offset_blocks, self.blocks(buf.len())) {
            Verdict::Fail(e) => Err(fail(e)),
            Verdict::Drop => Ok(buf),
            Verdict::Pass => {
                let r = self.base.write(offset_blocks, buf).await;
                self.writes_seen.fetch_add(1, Ordering::AcqRel);
                r
            }
        }
    }
    async fn readv(&self, offset_blocks: u64, bufs: Vec<IoBuf>) -> Result<Vec<IoBuf>> {
        let n = bufs.iter().map(|b| self.blocks(b.len())).sum();
        match self.judge(IoType::Read, offset_blocks, n) {
            Verdict::Fail(e) => Err(fail(e)),
            _ => self.base.readv(offset_blocks, bufs).await,
        }
    }
    async fn writev(&self, offset_blocks: u64, bufs: Vec<IoBuf>) -> Result<Vec<IoBuf>> {
        let n = bufs.iter().map(|b| self.blocks(b.len())).sum();
        match self.judge(IoType::Write, offset_blocks, n) {
            Verdict::Fail(e) => Err(fail(e)),
            Verdict::Drop => Ok(bufs),
            Verdict::Pass => {
                let r = self.base.writev(offset_blocks, bufs).await;
                self.writes_seen.fetch_add(1, Ordering::AcqRel);
                r
            }
        }
    }
    async fn flush(&self) -> Result<()> {
        match self.judge(IoType::Flush, 0, 0) {
            Verdict::Fail(e) => Err(fail(e)),
            _ => self.base.flush().await,
        }
    }
    async fn unmap(&self, offset_blocks: u64, num_blocks: u64) -> Result<()> {
        match self.judge(IoType::Unmap, offset_blocks, num_blocks) {
            Verdict::Fail(e) => Err(fail(e)),
            Verdict::Drop => Ok(()),
            Verdict::Pass => self.base.unmap(offset_blocks, num_blocks).await,
        }
    }
    async fn write_zeroes(&self, offset_blocks: u64, num_blocks: u64) -> Result<()> {
        match self.judge(IoType::WriteZeroes, offset_blocks, num_blocks) {
            Verdict::Fail(e) => Err(fail(e)),
            Verdict::Drop => Ok(()),
            Verdict::Pass => self.base.write_zeroes(offset_blocks, num_blocks).await,
        }
    }
    async fn reset(&self) -> Result<()> {
        match self.judge(IoType::Reset, 0, 0) {
            Verdict::Fail(e) => Err(fail(e)),
            _ => self.base.reset().await,
        }
    }
    /// Releases the claim on the base (the base descriptor itself closes when the last
    /// reference to the error bdev is dropped).
    async fn destruct(&self) {
        self.base.release_claim();
    }
    fn write_config(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({
            "method": "bdev_error_create",
            "params": {"base_name": self.base.name()}
        }))
    }
}
