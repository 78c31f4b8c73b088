//! Command-line parsing with SPDK blobcli's rules: one `getopt` string
//! (`b:d:f:hij:l:m:n:p:r:s:w:DRST:Xx:`), the extra positional parameter some options take
//! (`-m <blobid> <file>`), the same error texts, and the same parse context reused by command,
//! shell and script modes. Our extensions are long options (`--image`, `--output`, `--check`)
//! and `-l lvols`.

use std::io::Write;
use std::path::PathBuf;

/// How the tool takes its commands (SPDK `cli_mode_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One command from the command line.
    Cmd,
    /// Interactive shell (`-S`).
    Shell,
    /// Script file (`-T`).
    Script,
}

/// What to do next (SPDK `cli_action_type`, plus ours).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing chosen yet (shell mode prompts).
    None,
    /// `-m`: import a file into a blob.
    ImportBlob,
    /// `-d`: dump a blob to a file.
    DumpBlob,
    /// `-f`: fill a blob with a byte.
    Fill,
    /// `-r`: remove an xattr.
    RemXattr,
    /// `-x`: set an xattr.
    SetXattr,
    /// `-p`: set the super blob.
    SetSuper,
    /// `-s bs`.
    ShowBs,
    /// `-s <blobid>`.
    ShowBlob,
    /// `-n`: create a blob.
    CreateBlob,
    /// `-l bdevs`.
    ListBdevs,
    /// `-l blobs`.
    ListBlobs,
    /// `-l lvols` (ours).
    ListLvols,
    /// `-i`.
    InitBs,
    /// `-D`.
    DumpBs,
    /// `-X`.
    ShellExit,
    /// `-h`.
    Help,
    /// `-R`.
    Recover,
    /// `-w`.
    DeleteBlob,
    /// `--check` (ours).
    Check,
}

impl Action {
    /// Whether the action changes the device.
    pub fn writes(self) -> bool {
        matches!(
            self,
            Action::ImportBlob
                | Action::Fill
                | Action::RemXattr
                | Action::SetXattr
                | Action::SetSuper
                | Action::CreateBlob
                | Action::InitBs
                | Action::Recover
                | Action::DeleteBlob
        )
    }
}

/// A blob named on the command line: an id, or an lvol alias `lvs/name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobRef {
    /// A blob id.
    Id(u64),
    /// `lvs_name/lvol_name`.
    Alias(String),
}

/// The parse context, kept across the commands of a shell or script session
/// (SPDK `cli_context_t`).
#[derive(Clone, Debug)]
pub struct Ctx {
    /// Current mode.
    pub mode: Mode,
    /// Current action.
    pub action: Action,
    /// `-b`.
    pub bdev_name: String,
    /// `-j`.
    pub config_file: Option<String>,
    /// `--image`.
    pub image: Option<PathBuf>,
    /// `--output json`.
    pub json: bool,
    /// `--check` given together with `-R`: check after recovering.
    pub check_after_recover: bool,
    /// Set once the bdevs are up (a `-j` afterwards is refused).
    pub app_started: bool,
    /// Blob the action works on.
    pub blob: BlobRef,
    /// `-p` argument.
    pub superid: u64,
    /// File of `-m` / `-d`.
    pub file: String,
    /// Xattr name.
    pub key: String,
    /// Xattr value.
    pub value: String,
    /// `-f` value.
    pub fill_value: u8,
    /// `-n` value.
    pub num_clusters: u64,
    /// `-T` file.
    pub script_file: String,
    /// `-T file ignore`.
    pub ignore_errors: bool,
}

impl Default for Ctx {
    fn default() -> Self {
        Ctx {
            mode: Mode::Cmd,
            action: Action::None,
            bdev_name: String::new(),
            config_file: None,
            image: None,
            json: false,
            check_after_recover: false,
            app_started: false,
            blob: BlobRef::Id(0),
            superid: 0,
            file: String::new(),
            key: String::new(),
            value: String::new(),
            fill_value: 0,
            num_clusters: 0,
            script_file: String::new(),
            ignore_errors: false,
        }
    }
}

/// SPDK's version line for the usage text.
pub const VERSION: &str = concat!("spdk-rs blobcli ", env!("CARGO_PKG_VERSION"));

/// The command list (SPDK `print_cmds`), plus our extensions.
pub fn print_cmds(out: &mut dyn Write) {
    let _ = write!(
        out,
        "\nCommands include:\n\
         \t-b bdev - name of the block device to use (example: Nvme0n1)\n\
         \t-d <blobid> filename - dump contents of a blob to a file\n\
         \t-D - dump metadata contents of an existing blobstore\n\
         \t-f <blobid> value - fill a blob with a decimal value\n\
         \t-h - this help screen\n\
         \t-i - initialize a blobstore\n\
         \t-l bdevs | blobs - list either available bdevs or existing blobs\n\
         \t-m <blobid> filename - import contents of a file to a blob\n\
         \t-n <# clusters> - create new blob\n\
         \t-p <blobid> - set the superblob to the ID provided\n\
         \t-r <blobid> name - remove xattr name/value pair\n\
         \t-R - recover the blobstore: like fsck for the blobstore\n\
         \t-s <blobid> | bs - show blob info or blobstore info\n\
         \t-S - enter interactive shell mode\n\
         \t-T <filename> - automated script mode\n\
         \t-w <blobid> - delete (whack) a blob\n\
         \t-x <blobid> name value - set xattr name/value pair\n\
         \t-X - exit when in interactive shell mode\n\
         \nExtensions:\n\
         \t--image <path> - use an aio bdev over this file (no config needed; read-only unless the command writes)\n\
         \t-l lvols - list the lvol store and its lvols, one line per lvol\n\
         \t-d <lvs/lvol> filename - dump an lvol by alias, through its snapshots and external snapshot\n\
         \t--output json - print -l and -s as JSON\n\
         \t--check - check the metadata (crc, chains, masks, cluster ownership); exit 0 clean, 1 damaged, 2 unreadable\n\
         \n"
    );
}

/// SPDK `usage()`: the message, then the banner in command mode, then the commands unless in
/// script mode.
pub fn usage(out: &mut dyn Write, mode: Option<Mode>, msg: &str) {
    let _ = write!(out, "{msg}");
    if mode.is_none() || mode == Some(Mode::Cmd) {
        let _ = writeln!(out, "Version {VERSION}");
        let _ = out.write_all(
            b"Usage: blobcli [-j SPDK josn_config_file] Command\n\
              \nblobcli is a command line tool for interacting with blobstore\n\
              on the underlying device specified in the conf file passed\n\
              in as a command line option.\n",
        );
    }
    if mode != Some(Mode::Script) {
        print_cmds(out);
    }
}

/// C `strtoll(s, &end, 0)` accepting only a whole, non-negative number (SPDK `spdk_strtoll`
/// with base 0): `0x` hex, leading `0` octal, else decimal.
pub fn parse_c_number(s: &str) -> Option<u64> {
    let t = s.trim_start();
    let t = t.strip_prefix('+').unwrap_or(t);
    if t.is_empty() {
        return None;
    }
    if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        if h.is_empty() {
            return None;
        }
        return u64::from_str_radix(h, 16)
            .ok()
            .filter(|v| *v <= i64::MAX as u64);
    }
    if t.len() > 1 && t.starts_with('0') {
        return u64::from_str_radix(&t[1..], 8)
            .ok()
            .filter(|v| *v <= i64::MAX as u64);
    }
    t.parse::<u64>().ok().filter(|v| *v <= i64::MAX as u64)
}

fn parse_blob_ref(s: &str, allow_alias: bool) -> Option<BlobRef> {
    if let Some(id) = parse_c_number(s) {
        return Some(BlobRef::Id(id));
    }
    if allow_alias && s.contains('/') && !s.starts_with('/') && !s.ends_with('/') {
        return Some(BlobRef::Alias(s.to_string()));
    }
    None
}

/// What the parser needs from outside: where messages go and how `-i` asks its question.
pub struct ParseIo<'a> {
    /// Standard output.
    pub out: &'a mut dyn Write,
    /// Reads one answer line for the `-i` question (`None` at end of input).
    pub ask: &'a mut dyn FnMut() -> Option<String>,
}

/// One option as getopt returned it: the letter, its argument and up to two extra
/// positional parameters.
type ParsedOpt = (char, Option<String>, Option<String>, Option<String>);

fn takes_arg(c: char) -> bool {
    "bdfjlmnprswTx".contains(c)
}

/// Parses one command line (argv without the program name) into `ctx`, printing SPDK's
/// messages. Returns true when exactly one command was chosen (SPDK `cmd_parser`).
/// `quit` is set when `-i` was declined in command mode.
pub fn cmd_parser(args: &[String], ctx: &mut Ctx, io: &mut ParseIo<'_>, quit: &mut bool) -> bool {
    let mut cmd_chosen = 0u32;
    let mut saw_check = false;
    let mut saw_recover = false;
    let mut i = 0usize;
    // Options and their arguments, in order, as getopt with GNU permutation yields them.
    let mut ops: Vec<ParsedOpt> = Vec::new();
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let needs = matches!(name, "image" | "output");
            let val = if needs {
                match inline {
                    Some(v) => Some(v),
                    None if i < args.len() => {
                        i += 1;
                        Some(args[i - 1].clone())
                    }
                    None => {
                        let _ = writeln!(io.out, "blobcli: option '--{name}' requires an argument");
                        ops.push(('?', None, None, None));
                        continue;
                    }
                }
            } else {
                inline
            };
            let code = match name {
                "image" => 'I',
                "output" => 'O',
                "check" => 'C',
                "help" => 'h',
                _ => {
                    let _ = writeln!(io.out, "blobcli: unrecognized option '--{name}'");
                    '?'
                }
            };
            ops.push((code, val, None, None));
            continue;
        }
        if a.len() < 2 || !a.starts_with('-') {
            // A non-option argument that no option consumed: getopt permutes it away.
            continue;
        }
        let chars: Vec<char> = a[1..].chars().collect();
        let mut k = 0;
        while k < chars.len() {
            let c = chars[k];
            k += 1;
            if !"bdfhijlmnprswDRSTXx".contains(c) {
                let _ = writeln!(io.out, "blobcli: invalid option -- '{c}'");
                ops.push(('?', None, None, None));
                continue;
            }
            if !takes_arg(c) {
                ops.push((c, None, None, None));
                continue;
            }
            let optarg = if k < chars.len() {
                let s: String = chars[k..].iter().collect();
                k = chars.len();
                s
            } else if i < args.len() {
                i += 1;
                args[i - 1].clone()
            } else {
                let _ = writeln!(io.out, "blobcli: option requires an argument -- '{c}'");
                ops.push(('?', None, None, None));
                continue;
            };
            // The extra parameters SPDK reads at argv[optind] (and argv[optind + 1] for -x).
            let n_extra = match c {
                'd' | 'f' | 'm' | 'r' | 'T' => 1,
                'x' => 2,
                _ => 0,
            };
            let mut extra = Vec::new();
            for _ in 0..n_extra {
                if i < args.len() && !(c == 'T' && args[i] != "ignore") {
                    extra.push(args[i].clone());
                    i += 1;
                }
            }
            let mut it = extra.into_iter();
            ops.push((c, Some(optarg), it.next(), it.next()));
        }
    }

    let mode = ctx.mode;
    for (op, optarg, p1, p2) in ops {
        let optarg = optarg.unwrap_or_default();
        match op {
            'b' => {
                if ctx.bdev_name.is_empty() {
                    ctx.bdev_name = optarg;
                } else {
                    let _ = writeln!(io.out, "Current setting for -b is: {}", ctx.bdev_name);
                    usage(
                        io.out,
                        Some(mode),
                        "ERROR: -b option can only be set once.\n",
                    );
                }
            }
            'D' => {
                cmd_chosen += 1;
                ctx.action = Action::DumpBs;
            }
            'd' | 'm' => match (p1, parse_blob_ref(&optarg, op == 'd')) {
                (Some(file), Some(b)) => {
                    cmd_chosen += 1;
                    ctx.action = if op == 'd' {
                        Action::DumpBlob
                    } else {
                        Action::ImportBlob
                    };
                    ctx.blob = b;
                    ctx.file = file;
                }
                (None, _) => usage(io.out, Some(mode), "ERROR: missing parameter.\n"),
                (Some(_), None) => usage(io.out, Some(mode), "ERROR: invalid blob id.\n"),
            },
            'f' => match (p1, parse_c_number(&optarg)) {
                (Some(v), Some(id)) => match parse_c_number(&v).filter(|v| *v <= 255) {
                    Some(fv) => {
                        cmd_chosen += 1;
                        ctx.action = Action::Fill;
                        ctx.blob = BlobRef::Id(id);
                        ctx.fill_value = fv as u8;
                    }
                    None => usage(io.out, Some(mode), "ERROR: invalid fill value.\n"),
                },
                (None, _) => usage(io.out, Some(mode), "ERROR: missing parameter.\n"),
                (Some(_), None) => usage(io.out, Some(mode), "ERROR: invalid blob id.\n"),
            },
            'h' => {
                cmd_chosen += 1;
                ctx.action = Action::Help;
            }
            'i' => {
                if mode != Mode::Script {
                    let _ = write!(
                        io.out,
                        "Your entire blobstore will be destroyed. Are you sure? (y/n) "
                    );
                    let _ = io.out.flush();
                    if let Some(ans) = (io.ask)() {
                        let c = ans.chars().next();
                        if c == Some('y') || c == Some('Y') {
                            cmd_chosen += 1;
                            ctx.action = Action::InitBs;
                        } else if mode == Mode::Cmd {
                            *quit = true;
                            return false;
                        }
                    }
                } else {
                    cmd_chosen += 1;
                    ctx.action = Action::InitBs;
                }
            }
            'j' => {
                if !ctx.app_started {
                    ctx.config_file = Some(optarg);
                } else {
                    usage(
                        io.out,
                        Some(mode),
                        "ERROR: -j option not valid during shell mode.\n",
                    );
                }
            }
            'r' => match (p1, parse_c_number(&optarg)) {
                (Some(key), Some(id)) => {
                    cmd_chosen += 1;
                    ctx.action = Action::RemXattr;
                    ctx.blob = BlobRef::Id(id);
                    ctx.key = key;
                }
                (None, _) => usage(io.out, Some(mode), "ERROR: missing parameter.\n"),
                (Some(_), None) => usage(io.out, Some(mode), "ERROR: invalid blob id.\n"),
            },
            'l' => match optarg.as_str() {
                "bdevs" => {
                    cmd_chosen += 1;
                    ctx.action = Action::ListBdevs;
                }
                "blobs" => {
                    cmd_chosen += 1;
                    ctx.action = Action::ListBlobs;
                }
                "lvols" => {
                    cmd_chosen += 1;
                    ctx.action = Action::ListLvols;
                }
                _ => usage(io.out, Some(mode), "ERROR: invalid option for list\n"),
            },
            'n' => match optarg.parse::<i64>() {
                Ok(n) if n > 0 => {
                    cmd_chosen += 1;
                    ctx.num_clusters = n as u64;
                    ctx.action = Action::CreateBlob;
                }
                _ => usage(io.out, Some(mode), "ERROR: invalid option for new\n"),
            },
            'p' => match parse_c_number(&optarg) {
                Some(id) => {
                    cmd_chosen += 1;
                    ctx.action = Action::SetSuper;
                    ctx.superid = id;
                }
                None => usage(io.out, Some(mode), "ERROR: invalid blob id.\n"),
            },
            'R' => {
                cmd_chosen += 1;
                saw_recover = true;
                ctx.action = Action::Recover;
            }
            'S' => {
                if ctx.mode == Mode::Cmd {
                    cmd_chosen += 1;
                    ctx.mode = Mode::Shell;
                }
                ctx.action = Action::None;
            }
            's' => {
                if optarg == "bs" {
                    cmd_chosen += 1;
                    ctx.action = Action::ShowBs;
                } else if let Some(b) = parse_blob_ref(&optarg, true) {
                    cmd_chosen += 1;
                    ctx.action = Action::ShowBlob;
                    ctx.blob = b;
                } else {
                    usage(io.out, Some(mode), "ERROR: invalid blob id.\n");
                }
            }
            'T' => {
                if ctx.mode == Mode::Cmd {
                    cmd_chosen += 1;
                    ctx.mode = Mode::Script;
                    ctx.ignore_errors = p1.as_deref() == Some("ignore");
                    ctx.script_file = optarg;
                } else {
                    ctx.action = Action::None;
                }
            }
            'w' => match parse_c_number(&optarg) {
                Some(id) => {
                    cmd_chosen += 1;
                    ctx.action = Action::DeleteBlob;
                    ctx.blob = BlobRef::Id(id);
                }
                None => usage(io.out, Some(mode), "ERROR: invalid blob id.\n"),
            },
            'X' => {
                cmd_chosen += 1;
                ctx.action = Action::ShellExit;
            }
            'x' => match (p1, p2, parse_c_number(&optarg)) {
                (Some(k), Some(v), Some(id)) => {
                    cmd_chosen += 1;
                    ctx.action = Action::SetXattr;
                    ctx.blob = BlobRef::Id(id);
                    ctx.key = k;
                    ctx.value = v;
                }
                (Some(_), Some(_), None) => usage(io.out, Some(mode), "ERROR: invalid blob id.\n"),
                _ => usage(io.out, Some(mode), "ERROR: missing parameter.\n"),
            },
            'I' => {
                if !ctx.app_started {
                    ctx.image = Some(PathBuf::from(optarg));
                } else {
                    usage(
                        io.out,
                        Some(mode),
                        "ERROR: --image option not valid during shell mode.\n",
                    );
                }
            }
            'O' => match optarg.as_str() {
                "json" => ctx.json = true,
                "text" => ctx.json = false,
                _ => usage(io.out, Some(mode), "ERROR: invalid option for output\n"),
            },
            'C' => {
                cmd_chosen += 1;
                saw_check = true;
                ctx.action = Action::Check;
            }
            _ => usage(io.out, Some(mode), "ERROR: invalid option\n"),
        }
        if saw_check && saw_recover {
            // `-R --check`: recover, then check; one command.
            saw_check = false;
            cmd_chosen -= 1;
            ctx.check_after_recover = true;
            ctx.action = Action::Recover;
        }
        if cmd_chosen > 1 {
            usage(
                io.out,
                Some(mode),
                "Error: Please choose only one command\n",
            );
        }
    }

    if ctx.mode == Mode::Cmd && cmd_chosen == 0 {
        usage(io.out, Some(ctx.mode), "Error: Please choose a command.\n");
    }

    if ctx.bdev_name.is_empty() && ctx.image.is_none() && ctx.action != Action::Help {
        usage(io.out, Some(ctx.mode), "Error: -b option is required.\n");
        cmd_chosen = 0;
    }
    cmd_chosen == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str, ctx: &mut Ctx) -> (bool, String) {
        let args: Vec<String> = line.split(' ').map(String::from).collect();
        let mut out = Vec::new();
        let mut ask = || Some("y".to_string());
        let mut quit = false;
        let ok = cmd_parser(
            &args,
            ctx,
            &mut ParseIo {
                out: &mut out,
                ask: &mut ask,
            },
            &mut quit,
        );
        (ok, String::from_utf8(out).unwrap())
    }

    #[test]
    fn numbers_follow_c_base_zero() {
        assert_eq!(parse_c_number("0x100000000"), Some(0x1_0000_0000));
        assert_eq!(parse_c_number("4294967296"), Some(0x1_0000_0000));
        assert_eq!(parse_c_number("010"), Some(8));
        assert_eq!(parse_c_number("0"), Some(0));
        assert_eq!(parse_c_number("12a"), None);
        assert_eq!(parse_c_number("-1"), None);
        assert_eq!(parse_c_number("0x"), None);
    }

    #[test]
    fn import_takes_file_after_blobid() {
        let mut ctx = Ctx::default();
        let (ok, out) = parse("-b Malloc0 -m 0x100000001 test.pattern", &mut ctx);
        assert!(ok, "{out}");
        assert_eq!(ctx.action, Action::ImportBlob);
        assert_eq!(ctx.blob, BlobRef::Id(0x1_0000_0001));
        assert_eq!(ctx.file, "test.pattern");
    }

    #[test]
    fn errors_match_spdk_texts() {
        let mut ctx = Ctx::default();
        let (ok, out) = parse("-b Malloc0 -n 0", &mut ctx);
        assert!(!ok);
        assert!(out.starts_with("ERROR: invalid option for new\n"), "{out}");
        let mut ctx = Ctx::default();
        let (ok, out) = parse("-b Malloc0 -s bs -l blobs", &mut ctx);
        assert!(!ok);
        assert!(out.contains("Error: Please choose only one command\n"));
        let mut ctx = Ctx::default();
        let (ok, out) = parse("-s bs", &mut ctx);
        assert!(!ok);
        assert!(out.contains("Error: -b option is required.\n"));
        let mut ctx = Ctx::default();
        let (ok, out) = parse("-b A -b B -s bs", &mut ctx);
        assert!(ok);
        assert!(out
            .starts_with("Current setting for -b is: A\nERROR: -b option can only be set once.\n"));
    }

    #[test]
    fn script_ignore_and_aliases() {
        let mut ctx = Ctx::default();
        let (ok, _) = parse("-b Malloc0 -T test.bs ignore", &mut ctx);
        assert!(ok);
        assert_eq!(ctx.mode, Mode::Script);
        assert!(ctx.ignore_errors);
        let mut ctx = Ctx::default();
        let (ok, _) = parse("--image x.img -d lvs/thin out.bin", &mut ctx);
        assert!(ok);
        assert_eq!(ctx.blob, BlobRef::Alias("lvs/thin".into()));
        let mut ctx = Ctx::default();
        let (ok, _) = parse("--image x.img -R --check", &mut ctx);
        assert!(ok);
        assert_eq!(ctx.action, Action::Recover);
        assert!(ctx.check_after_recover);
    }
}
