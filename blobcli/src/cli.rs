//! The session: start-up (config, script), the command, shell and script loops of SPDK's
//! `cli_start`, and every command. As in SPDK, each command loads the blobstore from the bdev
//! and unloads it again, so in shell and script modes a malloc bdev keeps the store between
//! commands. Commands that only look (list, show, dump, `-D`, `--check`) run on a read-only
//! descriptor with an in-memory overlay: the device is never written by them.

use std::io::{BufRead, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bdev_core::backend::aio::{AioBdev, AioOpts};
use bdev_core::Registry;
use blobstore::inspect;
use blobstore::{Blob, BlobId, BlobOpts, Blobstore, BsDev, BsOpts, IoBuf};
use futures::executor::block_on;
use futures::StreamExt;
use serde_json::json;

use crate::bsdev::{read_bytes, BdevBsDev, CountingDev, OverlayDev, RegistryEsnapFactory};
use crate::dump::{dump_metadata, hexdump};
use crate::lvols;
use crate::opts::{cmd_parser, usage, Action, BlobRef, Ctx, Mode, ParseIo};
use crate::progress::Progress;

/// How a command failed.
enum Fail {
    /// The command failed with this negative errno; the session goes on.
    Cmd(i32),
    /// The application stops with this code (SPDK `spdk_app_stop(-1)`).
    Stop(i32),
}

type CmdResult = Result<(), Fail>;

const MAX_IO_BYTES: u64 = 1 << 20;
const BUF_ALIGN: usize = 4096;
const READS_IN_FLIGHT: usize = 4;

/// `strerror` text without Rust's " (os error N)" suffix.
fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

struct Script {
    lines: Vec<String>,
    idx: usize,
    blobids: Vec<u64>,
}

/// One run of the tool.
pub struct Session {
    ctx: Ctx,
    registry: Registry,
    out: std::io::Stdout,
    input: Box<dyn BufRead>,
    script: Script,
    /// First failure (negative errno) of the session.
    rc: i32,
    /// Exit code chosen by a command itself (`--check`).
    exit_code: Option<i32>,
}

/// Runs blobcli with `args` (including the program name); returns the exit code.
pub fn run(args: Vec<String>) -> i32 {
    let mut out = std::io::stdout();
    if args.len() < 2 {
        usage(&mut out, None, "ERROR: Invalid option\n");
        return 255;
    }
    let mut ctx = Ctx::default();
    let mut input: Box<dyn BufRead> = Box::new(std::io::BufReader::new(std::io::stdin()));
    let mut quit = false;
    let chosen = {
        let mut ask = || read_line(&mut *input);
        let mut io = ParseIo {
            out: &mut out,
            ask: &mut ask,
        };
        cmd_parser(&args[1..], &mut ctx, &mut io, &mut quit)
    };
    if !chosen {
        let _ = out.flush();
        return if quit { 0 } else { 255 };
    }
    if ctx.action == Action::Help {
        usage(&mut out, Some(ctx.mode), "");
        return 0;
    }
    let unreadable = if ctx.action == Action::Check { 2 } else { 255 };
    let config = match (&ctx.config_file, &ctx.image) {
        (Some(c), _) => Some(PathBuf::from(c)),
        (None, Some(_)) => None,
        (None, None) => Some(PathBuf::from("blobcli.json")),
    };
    if let Some(c) = &config {
        if !c.exists() {
            let _ = out.write_all(
                b"Error: No config file found.\n\
                  To create a config file named 'blobcli.json' for your NVMe device:\n   \
                  <path to spdk>/scripts/gen_nvme.sh --json-with-subsystems > blobcli.json\n\
                  and then re-run the cli tool.\n",
            );
            return unreadable;
        }
    }
    let mut script = Script {
        lines: Vec::new(),
        idx: 0,
        blobids: Vec::new(),
    };
    if ctx.mode == Mode::Script {
        match std::fs::read(&ctx.script_file) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                for line in text.split_inclusive('\n') {
                    let l = line.trim_end_matches(['\n', '\r']);
                    if !l.starts_with('#') {
                        script.lines.push(l.to_string());
                    }
                }
                script.lines.push("-X".to_string());
            }
            Err(_) => {
                let _ = writeln!(out, "ERROR: unable to open script: {}", ctx.script_file);
                return 255;
            }
        }
    }
    ctx.app_started = true;

    let registry = Registry::new();
    let setup = block_on(async {
        if let Some(c) = &config {
            crate::config::load_config_file(&registry, c).await?;
        }
        if let Some(img) = ctx.image.clone() {
            let writable = match ctx.mode {
                Mode::Cmd => ctx.action.writes(),
                Mode::Shell => true,
                Mode::Script => script.lines.iter().any(|l| script_line_writes(l)),
            };
            let name = if ctx.bdev_name.is_empty() {
                img.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "image".into())
            } else {
                ctx.bdev_name.clone()
            };
            let dev = AioBdev::create(AioOpts {
                name: name.clone(),
                filename: img.clone(),
                block_len: Some(image_block_len(&img)),
                readonly: !writable,
                ..Default::default()
            })
            .map_err(|e| anyhow::anyhow!("cannot open image {}: {e}", img.display()))?;
            registry.register(dev).await?;
            ctx.bdev_name = name;
        }
        anyhow::Ok(())
    });
    if let Err(e) = setup {
        let _ = writeln!(out, "ERROR: {e:#}");
        let _ = writeln!(out, "ERROR!");
        return unreadable;
    }

    let mut s = Session {
        ctx,
        registry,
        out,
        input,
        script,
        rc: 0,
        exit_code: None,
    };
    let code = s.start();
    let _ = s.out.flush();
    code
}

fn read_line(input: &mut dyn BufRead) -> Option<String> {
    let mut l = Vec::new();
    match input.read_until(b'\n', &mut l) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(String::from_utf8_lossy(&l).into_owned()),
    }
}

fn script_line_writes(line: &str) -> bool {
    line.split(' ').any(|t| {
        matches!(
            t,
            "-i" | "-n" | "-p" | "-x" | "-r" | "-f" | "-m" | "-w" | "-R"
        )
    })
}

/// The block size for an `--image` file: the store's io_unit size when the file holds a
/// blobstore, else 4096.
fn image_block_len(path: &Path) -> u32 {
    let mut sb = [0u8; 4096];
    let ok = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut sb))
        .is_ok();
    if ok && &sb[..8] == b"SPDKBLOB" {
        let io_unit = u32::from_le_bytes([sb[88], sb[89], sb[90], sb[91]]);
        if io_unit.is_power_of_two() && (512..=65536).contains(&io_unit) {
            return io_unit;
        }
    }
    4096
}

impl Session {
    fn p(&mut self, s: &str) {
        let _ = self.out.write_all(s.as_bytes());
    }

    /// SPDK `cli_start`, as a loop. Returns the exit code.
    fn start(&mut self) -> i32 {
        loop {
            if self.ctx.mode == Mode::Script {
                while !self.line_parser() {}
            }
            if self.ctx.action == Action::None {
                while !self.shell() {}
            }
            let action = self.ctx.action;
            if action == Action::ShellExit {
                return self.final_code();
            }
            let r = match action {
                Action::Help => {
                    usage(&mut self.out, Some(self.ctx.mode), "");
                    Ok(())
                }
                _ => block_on(self.exec(action)),
            };
            match r {
                Ok(()) => {}
                Err(Fail::Cmd(rc)) => {
                    if self.rc == 0 {
                        self.rc = rc;
                    }
                }
                Err(Fail::Stop(rc)) => {
                    let _ = writeln!(self.out, "ERROR!");
                    return (rc as u8) as i32;
                }
            }
            if self.ctx.mode == Mode::Cmd {
                return self.final_code();
            }
            self.ctx.action = Action::None;
        }
    }

    fn final_code(&mut self) -> i32 {
        if let Some(c) = self.exit_code {
            return c;
        }
        if self.rc == 0 {
            return 0;
        }
        if self.ctx.mode == Mode::Cmd {
            let _ = writeln!(self.out, "ERROR!");
            (self.rc as u8) as i32
        } else {
            1
        }
    }

    fn parse(&mut self, args: &[String]) -> bool {
        let Session {
            ctx, out, input, ..
        } = self;
        let mut ask = || {
            let _ = out.flush();
            read_line(&mut **input)
        };
        let mut buf = Vec::new();
        let mut quit = false;
        let chosen = {
            let mut io = ParseIo {
                out: &mut buf,
                ask: &mut ask,
            };
            cmd_parser(args, ctx, &mut io, &mut quit)
        };
        let _ = self.out.write_all(&buf);
        chosen
    }

    /// SPDK `line_parser`: the next script line, with `$Bn` replaced by the n-th blob created.
    fn line_parser(&mut self) -> bool {
        let line = self
            .script
            .lines
            .get(self.script.idx)
            .cloned()
            .unwrap_or_else(|| "-X".to_string());
        self.script.idx += 1;
        self.p(&format!("\nSCRIPT NOW PROCESSING: {line}\n"));
        let mut args = Vec::new();
        for tok in line.split(' ').filter(|t| !t.is_empty()) {
            if let Some(n) = tok.strip_prefix("$B") {
                match n.parse::<usize>() {
                    Ok(n) => {
                        let id = self.script.blobids.get(n).copied().unwrap_or(0);
                        if id == 0 {
                            self.p(&format!("ERROR: There is no blob for $B{n}\n"));
                        }
                        args.push(id.to_string());
                    }
                    Err(_) => {
                        self.p("ERROR: Invalid token or exceeded max blobs of 16\n");
                        args.push(tok.to_string());
                    }
                }
            } else {
                args.push(tok.to_string());
            }
        }
        let chosen = self.parse(&args);
        if !chosen {
            self.p(&format!(
                "ERROR: Invalid script line starting with: {line}\n\n"
            ));
            if !self.ctx.ignore_errors {
                self.p("** Aborting **\n");
                self.ctx.action = Action::ShellExit;
                if self.rc == 0 {
                    self.rc = -libc::EINVAL;
                }
                return true;
            }
            self.p("** Skipping **\n");
        }
        chosen
    }

    /// SPDK `cli_shell`: prompt, read a line, parse it.
    fn shell(&mut self) -> bool {
        self.p("blob> ");
        let _ = self.out.flush();
        let Some(line) = read_line(&mut *self.input) else {
            self.ctx.action = Action::ShellExit;
            return true;
        };
        let line = line.trim_end_matches(['\n', '\r']);
        let args: Vec<String> = line
            .split(' ')
            .filter(|t| !t.is_empty())
            .map(String::from)
            .collect();
        self.parse(&args)
    }

    fn fail(&mut self, msg: &str, errno: i32) -> Fail {
        self.p(&format!("{msg} (err {})\n", -errno));
        Fail::Cmd(-errno)
    }

    fn open_dev(&mut self, write: bool) -> Result<Arc<dyn BsDev>, Fail> {
        match self.registry.open(&self.ctx.bdev_name, write) {
            Ok(desc) => {
                let base: Arc<dyn BsDev> = Arc::new(BdevBsDev::new(desc));
                Ok(if write {
                    base
                } else {
                    Arc::new(OverlayDev::new(base))
                })
            }
            Err(e) => {
                self.p(&format!(
                    "Could not create blob bdev, {}!!\n",
                    strerror(e.errno())
                ));
                Err(Fail::Stop(-1))
            }
        }
    }

    fn bs_opts(&self, recover: bool) -> BsOpts {
        BsOpts {
            force_recover: recover,
            esnap_factory: Some(Arc::new(RegistryEsnapFactory::new(self.registry.clone()))),
            ..Default::default()
        }
    }

    async fn load(&mut self, write: bool, recover: bool) -> Result<Blobstore, Fail> {
        let dev = self.open_dev(write)?;
        match Blobstore::load(dev, self.bs_opts(recover)).await {
            Ok(bs) => Ok(bs),
            Err(e) => Err(self.fail("Error in load callback", e.errno())),
        }
    }

    async fn unload(&mut self, bs: Blobstore, r: CmdResult) -> CmdResult {
        if let Err(e) = bs.unload().await {
            self.p(&format!("Error {} unloading the bobstore\n", -e.errno()));
            r?;
            return Err(Fail::Cmd(-e.errno()));
        }
        r
    }

    async fn resolve(&mut self, bs: &Blobstore, b: &BlobRef) -> Result<BlobId, Fail> {
        match b {
            BlobRef::Id(id) => Ok(*id),
            BlobRef::Alias(a) => {
                let found = if lvols::is_lvstore(bs) {
                    let info = lvols::gather(bs, &self.registry).await;
                    lvols::resolve_alias(&info, a)
                } else {
                    None
                };
                match found {
                    Some(id) => Ok(id),
                    None => {
                        self.p(&format!("Could not find lvol {a}\n"));
                        Err(Fail::Cmd(-libc::ENOENT))
                    }
                }
            }
        }
    }

    async fn open_blob(&mut self, bs: &Blobstore, id: BlobId, msg: &str) -> Result<Blob, Fail> {
        match bs.open_blob(id).await {
            Ok(b) => Ok(b),
            Err(e) => Err(self.fail(msg, e.errno())),
        }
    }

    async fn close_blob(&mut self, b: Blob, r: CmdResult) -> CmdResult {
        match b.close().await {
            Ok(()) => r,
            Err(e) => {
                let f = self.fail("Error in close callback", e.errno());
                r?;
                Err(f)
            }
        }
    }

    async fn exec(&mut self, action: Action) -> CmdResult {
        match action {
            Action::ListBdevs => self.list_bdevs(),
            Action::InitBs => self.init_bs().await,
            Action::DumpBs => self.dump_bs().await,
            Action::Check => self.check().await,
            Action::Recover => {
                let bs = self.load(true, true).await?;
                self.unload(bs, Ok(())).await?;
                if self.ctx.check_after_recover {
                    self.check().await?;
                }
                Ok(())
            }
            _ => {
                let write = action.writes();
                let bs = self.load(write, false).await?;
                let r = self.with_store(&bs, action).await;
                self.unload(bs, r).await
            }
        }
    }

    async fn with_store(&mut self, bs: &Blobstore, action: Action) -> CmdResult {
        match action {
            Action::ShowBs => self.show_bs(bs),
            Action::ListBlobs => self.list_blobs(bs),
            Action::ListLvols => {
                if !lvols::is_lvstore(bs) {
                    let t = bs.bstype();
                    let end = t.iter().position(|&c| c == 0).unwrap_or(16);
                    self.p(&format!(
                        "Not an lvol store: blobstore type is \"{}\" (use -l blobs)\n",
                        String::from_utf8_lossy(&t[..end])
                    ));
                    return Err(Fail::Cmd(-libc::ENXIO));
                }
                let info = lvols::gather(bs, &self.registry).await;
                if self.ctx.json {
                    self.p(&format!("{:#}\n", lvols::format_json(&info)));
                } else {
                    self.p(&lvols::format_text(&info));
                }
                Ok(())
            }
            Action::SetSuper => match bs.set_super_blob(self.ctx.superid).await {
                Ok(()) => {
                    self.p("Super Blob ID has been set.\n");
                    Ok(())
                }
                Err(e) => Err(self.fail("Error in set_super callback", e.errno())),
            },
            Action::CreateBlob => self.create_blob(bs).await,
            Action::DeleteBlob => {
                let id = self.resolve(bs, &self.ctx.blob.clone()).await?;
                match bs.delete_blob(id).await {
                    Ok(()) => {
                        self.p(&format!("Blob 0x{id:x} has been deleted.\n"));
                        Ok(())
                    }
                    Err(e) => Err(self.fail("Error in delete_blob callback", e.errno())),
                }
            }
            Action::SetXattr | Action::RemXattr => {
                let id = self.resolve(bs, &self.ctx.blob.clone()).await?;
                let b = self
                    .open_blob(bs, id, "Error in blob open callback")
                    .await?;
                let key = self.ctx.key.clone();
                if action == Action::SetXattr {
                    let mut v = self.ctx.value.clone().into_bytes();
                    v.push(0);
                    let _ = b.set_xattr(&key, &v);
                    self.p("Xattr has been set.\n");
                } else {
                    let _ = b.remove_xattr(&key);
                    self.p("Xattr has been removed.\n");
                }
                let r = match b.sync_md().await {
                    Ok(()) => Ok(()),
                    Err(e) => Err(self.fail("Error in sync callback", e.errno())),
                };
                self.close_blob(b, r).await
            }
            Action::ShowBlob => {
                let id = self.resolve(bs, &self.ctx.blob.clone()).await?;
                let b = match bs.open_blob(id).await {
                    Ok(b) => b,
                    Err(e) => {
                        // SPDK prints nothing for a blob it does not find; say why on stderr.
                        eprintln!(
                            "blobcli: cannot open blob 0x{id:x}: {}",
                            strerror(e.errno())
                        );
                        return Err(Fail::Cmd(-e.errno()));
                    }
                };
                self.show_blob(bs, &b);
                self.close_blob(b, Ok(())).await
            }
            // The whole-blob transfers: open, transfer, close.
            Action::Fill | Action::ImportBlob | Action::DumpBlob => {
                let id = self.resolve(bs, &self.ctx.blob.clone()).await?;
                let open_failed = if action == Action::Fill {
                    "Error in open callback"
                } else {
                    "Error in blob open callback"
                };
                let b = self.open_blob(bs, id, open_failed).await?;
                let r = match action {
                    Action::Fill => self.fill(bs, &b).await,
                    Action::ImportBlob => self.import(bs, &b).await,
                    _ => self.dump_blob(bs, &b).await,
                };
                self.close_blob(b, r).await
            }
            _ => Ok(()),
        }
    }

    fn list_bdevs(&mut self) -> CmdResult {
        let devs = self.registry.list();
        if self.ctx.json {
            let v: Vec<_> = devs
                .iter()
                .map(|d| {
                    json!({
                        "name": d.name(),
                        "product_name": d.product_name(),
                        "uuid": d.uuid().to_string(),
                        "block_size": d.block_len(),
                        "num_blocks": d.num_blocks(),
                    })
                })
                .collect();
            self.p(&format!("{:#}\n", json!({ "bdevs": v })));
            return Ok(());
        }
        self.p("\nList bdevs:\n");
        for d in &devs {
            self.p(&format!(
                "\tbdev Name: {}\n\tbdev Product Name: {}\n",
                d.name(),
                d.product_name()
            ));
        }
        if devs.is_empty() {
            self.p("Could not find a bdev\n");
        }
        self.p("\n");
        Ok(())
    }

    async fn init_bs(&mut self) -> CmdResult {
        self.p(&format!(
            "Init blobstore using bdev Name: {}\n",
            self.ctx.bdev_name
        ));
        let dev = self.open_dev(true)?;
        let opts = BsOpts {
            cluster_size: 1 << 20,
            ..Default::default()
        };
        let bs = match Blobstore::init(dev, opts).await {
            Ok(bs) => bs,
            Err(e) => return Err(self.fail("Error in bs init callback", e.errno())),
        };
        self.p(&format!(
            "blobstore init'd: (0x{:x})\n",
            std::ptr::addr_of!(bs) as usize
        ));
        self.unload(bs, Ok(())).await
    }

    async fn dump_bs(&mut self) -> CmdResult {
        self.p(&format!(
            "Init blobstore using bdev Name: {}\n",
            self.ctx.bdev_name
        ));
        let dev = self.open_dev(false)?;
        let mut buf = Vec::new();
        let r = dump_metadata(&mut buf, &*dev).await;
        let _ = self.out.write_all(&buf);
        r.map_err(Fail::Cmd)
    }

    fn show_bs(&mut self, bs: &Blobstore) -> CmdResult {
        let product = self
            .registry
            .get(&self.ctx.bdev_name)
            .map(|d| d.product_name().to_string())
            .unwrap_or_default();
        let bstype = bs.bstype();
        if self.ctx.json {
            let end = bstype.iter().position(|&b| b == 0).unwrap_or(16);
            let v = json!({
                "bdev_name": self.ctx.bdev_name,
                "product_name": product,
                "api_version": 3,
                "super_blob_id": bs.super_blob().map(|b| format!("0x{b:x}")),
                "md_page_size": bs.md_page_size(),
                "io_unit_size": bs.io_unit_size(),
                "cluster_size": bs.cluster_size(),
                "free_clusters": bs.free_clusters(),
                "total_clusters": bs.total_clusters(),
                "total_data_clusters": bs.total_data_clusters(),
                "bstype": String::from_utf8_lossy(&bstype[..end]),
                "md_start": bs.md_start(),
                "md_len": bs.md_len(),
            });
            self.p(&format!("{v:#}\n"));
            return Ok(());
        }
        let mut s = String::new();
        s.push_str("Blobstore Public Info:\n");
        s.push_str(&format!("\tUsing bdev Product Name: {product}\n"));
        s.push_str("\tAPI Version: 3\n");
        match bs.super_blob() {
            Some(id) => s.push_str(&format!("\tsuper blob ID: 0x{id:x}\n")),
            None => s.push_str("\tsuper blob ID: none assigned\n"),
        }
        s.push_str(&format!("\tmd page size: {}\n", bs.md_page_size()));
        s.push_str(&format!("\tio unit size: {}\n", bs.io_unit_size()));
        s.push_str(&format!("\tcluster size: {}\n", bs.cluster_size()));
        s.push_str(&format!("\t# free clusters: {}\n", bs.free_clusters()));
        self.p(&s);
        let mut buf = Vec::new();
        let _ = hexdump(&mut buf, "\tblobstore type:", &bstype);
        let _ = self.out.write_all(&buf);
        self.p(&format!(
            "\nBlobstore Private Info:\n\tMetadata start (pages): {}\n\tMetadata length (pages): {}\n",
            bs.md_start(),
            bs.md_len()
        ));
        Ok(())
    }

    fn show_blob(&mut self, bs: &Blobstore, b: &Blob) {
        let names = b.xattr_names();
        if self.ctx.json {
            let xattrs: serde_json::Map<String, serde_json::Value> = names
                .iter()
                .map(|n| {
                    let v = b.get_xattr(n).unwrap_or_default();
                    (
                        n.clone(),
                        json!({"hex": hex_string(&v), "text": lvols::xattr_string(&v), "len": v.len()}),
                    )
                })
                .collect();
            let v = json!({
                "blob_id": format!("0x{:x}", b.id()),
                "num_clusters": b.num_clusters(),
                "size_bytes": b.num_clusters() * bs.cluster_size() as u64,
                "num_io_units": b.num_io_units(),
                "num_allocated_clusters": b.num_allocated_clusters(),
                "thin": b.is_thin(),
                "read_only": b.is_read_only(),
                "xattrs": xattrs,
            });
            self.p(&format!("{v:#}\n"));
            return;
        }
        let mut buf: Vec<u8> = Vec::new();
        let n = b.num_clusters();
        let _ = write!(
            buf,
            "Blob Public Info:\nblob ID: 0x{:x}\n# of clusters: {n}\n# of bytes: {}\n# of io units: {}\n# of xattrs: {}\nxattrs:\n",
            b.id(),
            n * bs.cluster_size() as u64,
            b.num_io_units(),
            names.len()
        );
        for (i, name) in names.iter().enumerate() {
            let v = b.get_xattr(name).unwrap_or_default();
            let mut len = v.len();
            if len > 255 {
                let _ = writeln!(buf, "FYI: adjusting size of xattr due to CLI limits.");
                len = 256;
            }
            let _ = write!(buf, "\n({i}) Name:{name}\n({i}) Value:\n");
            let _ = hexdump(&mut buf, "", &v[..len.saturating_sub(1)]);
        }
        let _ = write!(
            buf,
            "\nBlob Private Info:\nstate: CLEAN\nopen ref count: 1\n"
        );
        let _ = self.out.write_all(&buf);
    }

    fn list_blobs(&mut self, bs: &Blobstore) -> CmdResult {
        let ids = bs.blob_ids();
        if self.ctx.json {
            let v: Vec<String> = ids.iter().map(|i| format!("0x{i:x}")).collect();
            self.p(&format!("{:#}\n", json!({ "blobs": v })));
            return Ok(());
        }
        let mut s = String::new();
        for id in ids {
            s.push_str(&format!("\nList BLOBS:\nFound blob with ID# 0x{id:x}\n"));
        }
        self.p(&s);
        Ok(())
    }

    async fn create_blob(&mut self, bs: &Blobstore) -> CmdResult {
        let id = match bs.create_blob(BlobOpts::default()).await {
            Ok(id) => id,
            Err(e) => return Err(self.fail("Error in blob create callback", e.errno())),
        };
        self.p(&format!("New blob id 0x{id:x}\n"));
        if self.ctx.mode == Mode::Script {
            self.script.blobids.push(id);
        }
        let b = self.open_blob(bs, id, "Error in open completion").await?;
        let r = match b.resize(self.ctx.num_clusters).await {
            Ok(()) => {
                self.p(&format!(
                    "blob now has USED clusters of {}\n",
                    b.num_clusters()
                ));
                match b.sync_md().await {
                    Ok(()) => Ok(()),
                    Err(e) => Err(self.fail("Error in sync callback", e.errno())),
                }
            }
            Err(e) => Err(self.fail("Error in blob resize", e.errno())),
        };
        self.close_blob(b, r).await
    }

    /// Writes one chunk of a fill or import; a failure ends the display and fails the
    /// command with SPDK's message.
    async fn write_chunk(
        &mut self,
        prog: &Progress,
        b: &Blob,
        off: u64,
        buf: IoBuf,
    ) -> Result<IoBuf, Fail> {
        match b.write(off, buf).await {
            Ok(buf) => Ok(buf),
            Err(e) => {
                prog.finish();
                Err(self.fail("Error in write completion", e.errno()))
            }
        }
    }

    /// Ends a display with SPDK's completion line (after the dots' newline in plain mode).
    fn complete(&mut self, prog: &Progress, line: &str) -> CmdResult {
        let bar = prog.is_bar();
        prog.finish();
        self.p(&format!("{}{line}\n", if bar { "" } else { "\n" }));
        Ok(())
    }

    /// The file of an import or dump, or `None` when it could not be opened: then the
    /// progress line ends and `msg(error)` is printed, and the command ends there without
    /// failing, as SPDK's.
    fn opened(
        &mut self,
        prog: &Progress,
        opened: std::io::Result<std::fs::File>,
        msg: impl FnOnce(&std::io::Error) -> String,
    ) -> Option<std::fs::File> {
        match opened {
            Ok(f) => Some(f),
            Err(e) => {
                prog.finish();
                self.p(&msg(&e));
                None
            }
        }
    }

    /// How a whole-blob transfer goes: the io unit size, the blob's size in io units and the
    /// io units per request.
    fn chunking(bs: &Blobstore, b: &Blob) -> (u64, u64, u64) {
        let io = bs.io_unit_size().max(1) as u64;
        (io, b.num_io_units(), Self::chunk_units(bs))
    }

    /// The requests of a whole-blob transfer of `total` io units: `(offset, length)` in io
    /// units, at most `per` long.
    fn chunks(total: u64, per: u64) -> impl Iterator<Item = (u64, u64)> {
        (0..total.div_ceil(per)).map(move |i| (i * per, per.min(total - i * per)))
    }

    fn chunk_units(bs: &Blobstore) -> u64 {
        let io = bs.io_unit_size().max(1) as u64;
        (MAX_IO_BYTES / io).max(1)
    }

    async fn fill(&mut self, bs: &Blobstore, b: &Blob) -> CmdResult {
        let (io, total, per) = Self::chunking(bs, b);
        let value = self.ctx.fill_value;
        let prog = Progress::start(&mut self.out, total * io, "fill");
        let mut spare: Option<IoBuf> = None;
        for (off, n) in Self::chunks(total, per) {
            let len = (n * io) as usize;
            // The written buffer comes back; it already holds the pattern.
            let buf = spare.take().filter(|b| b.len() == len).unwrap_or_else(|| {
                let mut b = IoBuf::new(len, BUF_ALIGN);
                b.fill(value);
                b
            });
            spare = Some(self.write_chunk(&prog, b, off, buf).await?);
            prog.advance(&mut self.out, n * io, n);
        }
        self.complete(&prog, &format!("Blob fill complete (with 0x{value:x})."))
    }

    async fn import(&mut self, bs: &Blobstore, b: &Blob) -> CmdResult {
        let (io, total, per) = Self::chunking(bs, b);
        let file = self.ctx.file.clone();
        let prog = Progress::start(&mut self.out, total * io, "import");
        let opened = std::fs::File::open(&file);
        let Some(mut f) = self.opened(&prog, opened, |e| {
            format!(
                "Error in opening file: errno {}\n",
                e.raw_os_error().unwrap_or(libc::EIO)
            )
        }) else {
            return Ok(());
        };
        let mut eof = false;
        let mut spare: Option<IoBuf> = None;
        for (off, n) in Self::chunks(total, per) {
            let len = (n * io) as usize;
            let mut buf = spare
                .take()
                .filter(|b| b.len() == len)
                .unwrap_or_else(|| IoBuf::new(len, BUF_ALIGN));
            let mut got = 0usize;
            while !eof && got < buf.len() {
                match f.read(&mut buf[got..]) {
                    Ok(0) => eof = true,
                    Ok(k) => got += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        prog.finish();
                        self.p(&format!(
                            "Error in fread: errno {}\n",
                            e.raw_os_error().unwrap_or(libc::EIO)
                        ));
                        return Err(Fail::Cmd(-e.raw_os_error().unwrap_or(libc::EIO)));
                    }
                }
            }
            // Past the end of the file the rest of the blob is zeroed.
            buf[got..].fill(0);
            spare = Some(self.write_chunk(&prog, b, off, buf).await?);
            // SPDK prints a dot before every write but the first.
            let dots = if off == 0 { n - 1 } else { n };
            prog.advance(&mut self.out, n * io, dots);
        }
        self.complete(&prog, &format!("Blob import complete (from {file})."))
    }

    async fn dump_blob(&mut self, bs: &Blobstore, b: &Blob) -> CmdResult {
        let (io, total, per) = Self::chunking(bs, b);
        let file = self.ctx.file.clone();
        let prog = Progress::start(&mut self.out, total * io, "dump");
        let opened = std::fs::File::create(&file);
        let Some(mut f) = self.opened(&prog, opened, |_| "Error in opening file\n".into()) else {
            return Ok(());
        };
        if b.num_clusters() == 0 {
            prog.finish();
            return Ok(());
        }
        // A few reads in flight, written in order; all-zero chunks become holes. Buffers are
        // recycled: fresh large allocations cost page faults on every chunk.
        let pool: std::sync::Mutex<Vec<IoBuf>> = std::sync::Mutex::new(Vec::new());
        let mut reads = futures::stream::iter(Self::chunks(total, per))
            .map(|(off, n)| {
                let pool = &pool;
                async move {
                    let len = (n * io) as usize;
                    let spare = pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
                    let buf = match spare {
                        Some(b) if b.len() == len => b,
                        _ => IoBuf::new(len, BUF_ALIGN),
                    };
                    (n, b.read(off, buf).await)
                }
            })
            .buffered(READS_IN_FLIGHT);
        let mut written = 0u64;
        let zeroes = vec![0u8; (per * io) as usize];
        // Holes only in regular files (not /dev/null, pipes or devices).
        let sparse = f.metadata().map(|m| m.is_file()).unwrap_or(false);
        while let Some((n, r)) = reads.next().await {
            let buf = match r {
                Ok(buf) => buf,
                Err(e) => {
                    prog.finish();
                    let cluster = written / bs.cluster_size().max(1) as u64;
                    eprintln!(
                        "blobcli: reading blob 0x{:x} at byte {written} (cluster {cluster}) failed: {e}",
                        b.id()
                    );
                    return Err(self.fail("Error in read completion", e.errno()));
                }
            };
            // memcmp against a zero buffer: fast even in debug builds.
            let res = if sparse && buf[..] == zeroes[..buf.len()] {
                f.seek(std::io::SeekFrom::Current(buf.len() as i64))
                    .map(|_| ())
            } else {
                f.write_all(&buf)
            };
            written += buf.len() as u64;
            if let Err(e) = res {
                prog.finish();
                return Err(self.fail("Error with fwrite", e.raw_os_error().unwrap_or(libc::EIO)));
            }
            pool.lock().unwrap_or_else(|e| e.into_inner()).push(buf);
            prog.advance(&mut self.out, n * io, n);
        }
        drop(reads);
        let fin = if sparse { f.set_len(written) } else { Ok(()) };
        if let Err(e) = fin.and_then(|_| f.flush()) {
            prog.finish();
            return Err(self.fail("Error with fwrite", e.raw_os_error().unwrap_or(libc::EIO)));
        }
        self.complete(&prog, &format!("File write complete (to {file})."))
    }

    /// `--check`: exit 0 clean, 1 damaged, 2 unreadable, 3 needs recovery (findings that a
    /// load repairs). Never writes.
    async fn check(&mut self) -> CmdResult {
        let desc = match self.registry.open(&self.ctx.bdev_name, false) {
            Ok(d) => d,
            Err(e) => {
                self.p(&format!(
                    "Could not create blob bdev, {}!!\n",
                    strerror(e.errno())
                ));
                self.exit_code = Some(2);
                return Err(Fail::Cmd(-e.errno()));
            }
        };
        let base: Arc<dyn BsDev> = Arc::new(BdevBsDev::new(desc));
        // The metadata size, for the progress display.
        let total = match read_bytes(&*base, 0, 4096).await {
            Ok(sb) => match inspect::parse_super(&sb) {
                Ok(s) => (s.md_start as u64 + s.md_len as u64) * 4096,
                Err(_) => 4096,
            },
            Err(_) => 4096,
        };
        let prog = Arc::new(if self.ctx.json {
            Progress::hidden()
        } else {
            Progress::start(&mut self.out, total, "check")
        });
        let _ = self.out.flush();
        let p2 = prog.clone();
        let counting = CountingDev::new(
            base.clone(),
            Box::new(move |bytes| {
                let mut o = std::io::stdout();
                p2.advance(&mut o, bytes, bytes.div_ceil(4096));
            }),
        );
        let dev: Arc<dyn BsDev> = Arc::new(OverlayDev::new(Arc::new(counting)));
        let res = inspect::check(dev).await;
        let bar = prog.is_bar();
        if let Ok(p) = Arc::try_unwrap(prog) {
            p.finish();
        }
        if !bar {
            self.p("\n");
        }
        match res {
            Err(e) => {
                self.p(&format!(
                    "Check failed: cannot read a blobstore on bdev {}: {e}\n",
                    self.ctx.bdev_name
                ));
                self.exit_code = Some(2);
                Err(Fail::Cmd(-e.errno()))
            }
            Ok(rep) => {
                let clean = rep.problems.is_empty();
                // Findings on a store left dirty may be what any load repairs (an unfinished
                // snapshot, pages of a cut metadata write): replay that load in memory.
                let needs_recovery = !clean && recovery_repairs(base.clone()).await;
                let result = if clean {
                    "clean"
                } else if needs_recovery {
                    "needs recovery"
                } else {
                    "damaged"
                };
                if self.ctx.json {
                    let v = json!({
                        "bdev_name": self.ctx.bdev_name,
                        "clean": clean,
                        "result": result,
                        "blobs": rep.blobs,
                        "used_md_pages": rep.used_md_pages,
                        "used_clusters": rep.used_clusters,
                        "problems": rep.problems,
                    });
                    self.p(&format!("{v:#}\n"));
                } else {
                    let mut s = format!(
                        "Blobstore check of bdev {}: {} blobs, {} md pages used, {} clusters used\n",
                        self.ctx.bdev_name, rep.blobs, rep.used_md_pages, rep.used_clusters
                    );
                    for p in &rep.problems {
                        s.push_str(&format!("PROBLEM: {p}\n"));
                    }
                    if clean {
                        s.push_str("Result: clean\n");
                    } else if needs_recovery {
                        s.push_str(&format!(
                            "Result: needs recovery ({} finding{} that loading the store repairs: \
                             the store was not unloaded cleanly; `blobcli -R` or the target's \
                             load recovers it with its data)\n",
                            rep.problems.len(),
                            if rep.problems.len() == 1 { "" } else { "s" }
                        ));
                    } else {
                        s.push_str(&format!(
                            "Result: damaged ({} problem{})\n",
                            rep.problems.len(),
                            if rep.problems.len() == 1 { "" } else { "s" }
                        ));
                    }
                    self.p(&s);
                }
                if clean {
                    self.exit_code = Some(0);
                    Ok(())
                } else if needs_recovery {
                    self.exit_code = Some(3);
                    Ok(())
                } else {
                    self.exit_code = Some(1);
                    Err(Fail::Cmd(-libc::EILSEQ))
                }
            }
        }
    }
}

/// Whether loading the store (its crash recovery), replayed in memory over `base`, leaves
/// metadata that checks clean. Only a store whose super block says it was not unloaded
/// cleanly qualifies: a load does not repair a clean store. Nothing reaches `base`.
async fn recovery_repairs(base: Arc<dyn BsDev>) -> bool {
    let Ok(sb) = read_bytes(&*base, 0, 4096).await else {
        return false;
    };
    if inspect::parse_super(&sb).map_or(true, |s| s.clean != 0) {
        return false;
    }
    let overlay: Arc<dyn BsDev> = Arc::new(OverlayDev::new(base));
    let Ok(bs) = Blobstore::load(overlay.clone(), BsOpts::default()).await else {
        return false;
    };
    if bs.unload().await.is_err() {
        return false;
    }
    inspect::check(overlay)
        .await
        .is_ok_and(|rep| rep.problems.is_empty())
}

fn hex_string(v: &[u8]) -> String {
    v.iter().map(|b| format!("{b:02x}")).collect()
}
