//! The aio backend's JSON-RPC methods: `bdev_aio_create`, `bdev_aio_delete`,
//! `bdev_aio_rescan`. `bdev_aio_create` takes SPDK's parameters plus one of ours,
//! `direct_io` (default `true`; `false` = the page cache).

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;

use super::aio::{AioBdev, AioOpts};
use super::RpcDevs;
use crate::rpc::{decode, errno_err, parse_uuid, NameOnly, RpcError, RpcModule};
use crate::{BdevError, BlockDevice, Registry};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AioCreate {
    name: String,
    filename: String,
    #[serde(default)]
    block_size: u32,
    #[serde(default)]
    readonly: bool,
    #[serde(default)]
    fallocate: bool,
    uuid: Option<String>,
    #[serde(default)]
    nowait: bool,
    /// Ours, not SPDK's (its client never sends it): `false` opens the file through the page
    /// cache. Absent or `true`: O_DIRECT, falling back to buffered I/O where the file system
    /// refuses it (`driver_specific.aio.direct_io` says which).
    #[serde(default = "yes")]
    direct_io: bool,
}

fn yes() -> bool {
    true
}

/// The aio RPC module. Keeps the aio bdevs for `bdev_aio_rescan` (weak: the registry owns
/// them).
pub struct AioRpc(RpcDevs<AioBdev>);

impl AioRpc {
    /// A module over `registry`.
    pub fn new(registry: Registry) -> Arc<Self> {
        Arc::new(AioRpc(RpcDevs::new(registry)))
    }

    async fn create(&self, p: AioCreate) -> Result<Value, RpcError> {
        let uuid = parse_uuid(&p.uuid)?;
        if p.block_size != 0 && (p.block_size & 511 != 0 || !p.block_size.is_power_of_two()) {
            return Err(RpcError::new(
                -libc::EINVAL,
                format!(
                    "Invalid argument: block_size {} is not a power of two of at least 512",
                    p.block_size
                ),
            ));
        }
        if self.0.registry.get(&p.name).is_some() {
            return Err(RpcError::from_errno(libc::EEXIST));
        }
        let opts = AioOpts {
            name: p.name.clone(),
            filename: PathBuf::from(&p.filename),
            block_len: (p.block_size != 0).then_some(p.block_size),
            readonly: p.readonly,
            fallocate: p.fallocate,
            nowait: p.nowait,
            uuid,
            direct: p.direct_io,
            ..Default::default()
        };
        let dev = create_off_thread(opts).await.map_err(|e| match &e {
            // The file is held (by another bdev or process): say by whom, after SPDK's text.
            BdevError::Busy(who) => RpcError::new(
                -libc::EBUSY,
                format!("{}: {who}", crate::rpc::strerror(libc::EBUSY)),
            ),
            e => errno_err(e),
        })?;
        self.0.register(dev).await?;
        self.0.registry.wait_for_examine().await;
        Ok(Value::String(p.name))
    }

    /// `bdev_aio_rescan`: re-reads the file size; a change goes to every opener as a resize
    /// event. A smaller file is `-16`, as SPDK (which refuses to shrink an open bdev, and its
    /// rescan holds one descriptor itself).
    fn rescan(&self, name: &str) -> Result<Value, RpcError> {
        let enodev = || RpcError::from_errno(libc::ENODEV);
        let aio = self.0.find(name)?.ok_or_else(enodev)?;
        let path = aio.driver_specific()["aio"]["filename"]
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(enodev)?;
        let size = std::fs::File::open(&path)
            .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
            .map_err(|e| RpcError::from_errno(e.raw_os_error().unwrap_or(libc::EIO)))?;
        let old = aio.num_blocks();
        if size / u64::from(aio.block_len()) < old {
            return Err(RpcError::from_errno(libc::EBUSY));
        }
        let new = aio.rescan().map_err(|e| errno_err(&e))?;
        if new != old {
            tracing::info!(target: "bdev", "aio bdev {name} resized: {old} -> {new} blocks");
            self.0.registry.notify_resize(aio.name());
        }
        Ok(Value::Bool(true))
    }
}

#[async_trait]
impl RpcModule for AioRpc {
    fn methods(&self) -> Vec<&'static str> {
        vec!["bdev_aio_create", "bdev_aio_delete", "bdev_aio_rescan"]
    }

    async fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        match method {
            "bdev_aio_create" => self.create(decode(params)?).await,
            "bdev_aio_delete" => self.0.delete(params, "aio").await,
            "bdev_aio_rescan" => {
                let p: NameOnly = decode(params)?;
                self.rescan(&p.name)
            }
            _ => Err(RpcError::method_not_found()),
        }
    }
}

/// [`AioBdev::create`] on a thread of its own: opening may block (the exclusive lock is
/// retried for about a second, `fallocate` writes the whole file), and the caller is an
/// async RPC handler whose executor must not stall. Runtime-agnostic: a plain thread and a
/// oneshot channel.
async fn create_off_thread(opts: AioOpts) -> crate::Result<Arc<AioBdev>> {
    let (tx, rx) = futures::channel::oneshot::channel();
    std::thread::Builder::new()
        .name("aio-open".into())
        .spawn(move || {
            let _ = tx.send(AioBdev::create(opts));
        })
        .map_err(BdevError::Io)?;
    rx.await
        .map_err(|_| BdevError::Io(std::io::Error::other("aio open thread panicked")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn params_as_the_client_sends_them() {
        let p: AioCreate = decode(Some(json!({"block_size": 4096, "fallocate": false,
            "filename": "/path/f", "name": "aio0", "nowait": false, "readonly": false,
            "uuid": "7e5a0000-e5a0-4e5a-8e5a-000000000001"})))
        .unwrap();
        assert_eq!(
            parse_uuid(&p.uuid).unwrap().unwrap().to_string(),
            "7e5a0000-e5a0-4e5a-8e5a-000000000001"
        );
        assert!(parse_uuid(&Some("nope".into())).is_err());
    }

    /// The flags `path` is open with in this process (`/proc/self/fdinfo`), one per fd.
    fn open_flags(path: &std::path::Path) -> Vec<i32> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            if std::fs::read_link(e.path()).ok().as_deref() != Some(path) {
                continue;
            }
            let fdinfo = format!("/proc/self/fdinfo/{}", e.file_name().to_string_lossy());
            let info = std::fs::read_to_string(fdinfo).unwrap_or_default();
            if let Some(f) = info.lines().find_map(|l| l.strip_prefix("flags:")) {
                out.push(i32::from_str_radix(f.trim(), 8).unwrap());
            }
        }
        out
    }

    #[test]
    fn direct_io_false_opens_the_file_buffered_and_is_saved() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        // As /proc/self/fd shows it.
        let path = path.canonicalize().unwrap();
        futures::executor::block_on(async {
            let r = Registry::new();
            let m = AioRpc::new(r.clone());
            let create = |extra: Value| {
                let mut p = json!({"name": "a", "filename": path});
                p.as_object_mut()
                    .unwrap()
                    .extend(extra.as_object().unwrap().clone());
                m.call("bdev_aio_create", Some(p))
            };
            // A bad value is refused, nothing is created.
            for bad in [json!("none"), json!(0), json!(null)] {
                let e = create(json!({"direct_io": bad})).await.unwrap_err();
                assert_eq!(e, RpcError::decode_failed(), "{bad}");
                assert!(r.get("a").is_none());
            }
            create(json!({"direct_io": false})).await.unwrap();
            let a = r.get("a").unwrap();
            assert_eq!(a.driver_specific()["aio"]["direct_io"], false);
            assert_eq!(a.write_config().unwrap()["params"]["direct_io"], false);
            let flags = open_flags(&path);
            assert!(!flags.is_empty());
            assert!(flags.iter().all(|f| f & libc::O_DIRECT == 0), "{flags:?}");
            // Through the page cache: bytes written to the file with pwrite are read back.
            std::os::unix::fs::FileExt::write_all_at(
                &std::fs::OpenOptions::new().write(true).open(&path).unwrap(),
                &[0xa5; 512],
                512,
            )
            .unwrap();
            let back = a
                .read(1, crate::IoBuf::new(512, a.buf_align()))
                .await
                .unwrap();
            assert!(back.iter().all(|&b| b == 0xa5));
            drop(a);
            m.call("bdev_aio_delete", Some(json!({"name": "a"})))
                .await
                .unwrap();
            // The default (and `true`) ask for O_DIRECT and save no `direct_io`: the config
            // stays SPDK's.
            for extra in [json!({}), json!({"direct_io": true})] {
                create(extra.clone()).await.unwrap();
                let a = r.get("a").unwrap();
                let params = a.write_config().unwrap()["params"].clone();
                assert!(params.get("direct_io").is_none(), "{extra}: {params}");
                let direct = a.driver_specific()["aio"]["direct_io"] == true;
                assert!(
                    open_flags(&path)
                        .iter()
                        .all(|f| (f & libc::O_DIRECT != 0) == direct),
                    "{extra}"
                );
                drop(a);
                m.call("bdev_aio_delete", Some(json!({"name": "a"})))
                    .await
                    .unwrap();
            }
        });
    }
}
