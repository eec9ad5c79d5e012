//! The `llm` agent's tools, all confined to the workspace.
//!
//! Paths are relative to the workspace root: absolute paths, NUL bytes and
//! `..` that would climb above the root are refused before touching the file
//! system; then the path is resolved (symlinks included) and refused if it
//! lands outside the workspace. Writes resolve the deepest existing ancestor
//! the same way, create what is missing below it, and open the file with
//! `O_NOFOLLOW`.
//!
//! `bash` runs `sh -c` in the workspace in its own process group (shared code
//! with the `shell` agent), with a timeout and an output cap, killed on
//! abort. The sandbox around the agent, not this module, is what confines
//! what a shell command can reach.

use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::process::{self, End, Limits};
use crate::wire::AbortSignal;

/// Cap of `bash` output (bytes) and of what `read_file` returns (chars).
const OUTPUT_LIMIT: usize = 50_000;
/// Longest `bash` timeout a call may ask for.
const MAX_BASH_TIMEOUT: Duration = Duration::from_secs(3600);
const MAX_LIST_ENTRIES: usize = 1_000;
const MAX_GREP_MATCHES: usize = 200;
const MAX_GREP_FILES: usize = 20_000;
const MAX_GREP_FILE_BYTES: u64 = 2 * 1024 * 1024;
const MAX_LINE_CHARS: usize = 300;
/// Directories `list_files` (recursive) and `grep` do not descend into.
const SKIP_DIRS: &[&str] = &[".git", ".aishell", "node_modules", "target"];

pub(crate) const NAMES: &[&str] = &[
    "bash",
    "read_file",
    "write_file",
    "edit_file",
    "list_files",
    "grep",
];

/// The `tools` array of a Chat Completions request.
pub(crate) fn definitions() -> Value {
    let f = |name: &str, description: &str, parameters: Value| {
        json!({"type": "function", "function": {
            "name": name, "description": description, "parameters": parameters,
        }})
    };
    json!([
        f(
            "bash",
            "Run a shell command (sh -c) in the workspace directory and return its combined stdout and stderr and exit status. Output is capped; long-running commands time out.",
            json!({"type": "object", "properties": {
                "command": {"type": "string", "description": "The command line to run."},
                "timeout_secs": {"type": "number", "description": "Optional timeout in seconds."}
            }, "required": ["command"]})
        ),
        f(
            "read_file",
            "Read a text file of the workspace. Optionally a range of lines.",
            json!({"type": "object", "properties": {
                "path": {"type": "string", "description": "Path relative to the workspace root."},
                "offset": {"type": "integer", "description": "First line to return, 1-based."},
                "limit": {"type": "integer", "description": "How many lines to return."}
            }, "required": ["path"]})
        ),
        f(
            "write_file",
            "Create or overwrite a file of the workspace with the given content (parent directories are created).",
            json!({"type": "object", "properties": {
                "path": {"type": "string", "description": "Path relative to the workspace root."},
                "content": {"type": "string", "description": "The complete new content."}
            }, "required": ["path", "content"]})
        ),
        f(
            "edit_file",
            "Replace one exact occurrence of old_string with new_string in a file. Fails if old_string does not occur exactly once: include enough surrounding text to make it unique.",
            json!({"type": "object", "properties": {
                "path": {"type": "string", "description": "Path relative to the workspace root."},
                "old_string": {"type": "string", "description": "The exact text to replace."},
                "new_string": {"type": "string", "description": "The replacement text."}
            }, "required": ["path", "old_string", "new_string"]})
        ),
        f(
            "list_files",
            "List a directory of the workspace (directories end with /).",
            json!({"type": "object", "properties": {
                "path": {"type": "string", "description": "Directory relative to the workspace root; default the root."},
                "recursive": {"type": "boolean", "description": "List subdirectories too."}
            }})
        ),
        f(
            "grep",
            "Search files of the workspace for a string (or a regular expression) and return matching lines as path:line: text.",
            json!({"type": "object", "properties": {
                "pattern": {"type": "string", "description": "Text to look for."},
                "path": {"type": "string", "description": "File or directory to search; default the root."},
                "regex": {"type": "boolean", "description": "Treat pattern as a regular expression."},
                "ignore_case": {"type": "boolean", "description": "Case-insensitive search."}
            }, "required": ["pattern"]})
        ),
    ])
}

/// What a tool call produced.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) content: String,
    pub(crate) is_error: bool,
    /// The call was aborted; the turn must end with `ABORTED`.
    pub(crate) aborted: bool,
}

impl Outcome {
    fn ok(content: impl Into<String>) -> Self {
        Outcome {
            content: content.into(),
            is_error: false,
            aborted: false,
        }
    }

    fn err(content: impl Into<String>) -> Self {
        Outcome {
            content: content.into(),
            is_error: true,
            aborted: false,
        }
    }

    fn aborted(content: impl Into<String>) -> Self {
        Outcome {
            content: content.into(),
            is_error: true,
            aborted: true,
        }
    }
}

/// The workspace root, canonical, that every path must stay under.
#[derive(Debug, Clone)]
pub(crate) struct Workspace {
    root: PathBuf,
}

impl Workspace {
    pub(crate) fn new(root: &Path) -> std::io::Result<Self> {
        Ok(Workspace {
            root: fs::canonicalize(root)?,
        })
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// `rel` as a path below the root, without touching the file system.
    fn lexical(&self, rel: &str) -> Result<PathBuf, String> {
        if rel.contains('\0') {
            return Err("the path contains a NUL byte".to_string());
        }
        let path = Path::new(rel);
        if path.is_absolute() {
            return Err(format!(
                "{rel}: absolute paths are not allowed; use a path relative to the workspace root"
            ));
        }
        let mut out = PathBuf::new();
        for c in path.components() {
            match c {
                Component::CurDir => {}
                Component::Normal(part) => out.push(part),
                Component::ParentDir => {
                    if !out.pop() {
                        return Err(format!("{rel}: the path leads outside the workspace"));
                    }
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(format!("{rel}: absolute paths are not allowed"));
                }
            }
        }
        Ok(out)
    }

    fn inside(&self, resolved: &Path, rel: &str) -> Result<(), String> {
        if resolved.starts_with(&self.root) {
            Ok(())
        } else {
            Err(format!(
                "{rel}: the path resolves outside the workspace (through a symbolic link)"
            ))
        }
    }

    /// An existing path, symlinks resolved, inside the workspace.
    pub(crate) fn existing(&self, rel: &str) -> Result<PathBuf, String> {
        let lexical = self.lexical(rel)?;
        let full = self.root.join(&lexical);
        let resolved = fs::canonicalize(&full).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("{rel}: no such file or directory"),
            _ => format!("{rel}: {e}"),
        })?;
        self.inside(&resolved, rel)?;
        Ok(resolved)
    }

    /// A path to write: its deepest existing ancestor resolved and checked,
    /// the rest appended (those components do not exist, so hold no links).
    pub(crate) fn for_write(&self, rel: &str) -> Result<PathBuf, String> {
        let lexical = self.lexical(rel)?;
        if lexical.as_os_str().is_empty() {
            return Err(format!("{rel}: names the workspace directory itself"));
        }
        let mut existing = self.root.join(&lexical);
        let mut missing = Vec::new();
        loop {
            match fs::symlink_metadata(&existing) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    match existing.file_name() {
                        Some(name) => missing.push(name.to_os_string()),
                        None => return Err(format!("{rel}: cannot resolve the path")),
                    }
                    if !existing.pop() {
                        return Err(format!("{rel}: cannot resolve the path"));
                    }
                }
                Err(e) => return Err(format!("{rel}: {e}")),
            }
        }
        let mut resolved = fs::canonicalize(&existing).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                format!("{rel}: a symbolic link on the path points nowhere")
            }
            _ => format!("{rel}: {e}"),
        })?;
        self.inside(&resolved, rel)?;
        for name in missing.into_iter().rev() {
            resolved.push(name);
        }
        Ok(resolved)
    }

    /// `path` relative to the root, for messages.
    fn show(&self, path: &Path) -> String {
        match path.strip_prefix(&self.root) {
            Ok(p) if p.as_os_str().is_empty() => ".".to_string(),
            Ok(p) => p.display().to_string(),
            Err(_) => path.display().to_string(),
        }
    }
}

fn str_arg<'a>(args: &'a Value, key: &str) -> Result<&'a str, String> {
    args.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing string argument `{key}`"))
}

fn opt_str<'a>(args: &'a Value, key: &str) -> Option<&'a str> {
    args.get(key).and_then(Value::as_str)
}

fn opt_bool(args: &Value, key: &str) -> bool {
    match args.get(key) {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        _ => false,
    }
}

fn opt_u64(args: &Value, key: &str) -> Option<u64> {
    match args.get(key)? {
        Value::Number(n) => n.as_u64().or_else(|| n.as_f64().map(|f| f.max(0.0) as u64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Run one tool call. `arguments` is the raw JSON text the model sent.
pub(crate) async fn run(
    ws: &Workspace,
    name: &str,
    arguments: &str,
    bash_timeout: Duration,
    signal: &mut AbortSignal,
) -> Outcome {
    let args: Value = if arguments.trim().is_empty() {
        json!({})
    } else {
        match serde_json::from_str(arguments) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => return Outcome::err("the tool arguments must be a JSON object"),
            Err(e) => return Outcome::err(format!("the tool arguments are not valid JSON: {e}")),
        }
    };
    if name == "bash" {
        return bash(ws, &args, bash_timeout, signal).await;
    }
    if !NAMES.contains(&name) {
        return Outcome::err(format!(
            "unknown tool `{name}`; available tools: {}",
            NAMES.join(", ")
        ));
    }
    let ws2 = ws.clone();
    let name2 = name.to_string();
    let job = tokio::task::spawn_blocking(move || {
        let result = match name2.as_str() {
            "read_file" => read_file(&ws2, &args),
            "write_file" => write_file(&ws2, &args),
            "edit_file" => edit_file(&ws2, &args),
            "list_files" => list_files(&ws2, &args),
            _ => grep(&ws2, &args),
        };
        match result {
            Ok(s) => Outcome::ok(s),
            Err(e) => Outcome::err(e),
        }
    });
    tokio::select! {
        biased;
        _ = signal.aborted() => Outcome::aborted(format!("{name} was aborted")),
        r = job => r.unwrap_or_else(|e| Outcome::err(format!("{name} failed: {e}"))),
    }
}

async fn bash(
    ws: &Workspace,
    args: &Value,
    default_timeout: Duration,
    signal: &mut AbortSignal,
) -> Outcome {
    let command = match str_arg(args, "command") {
        Ok(c) if !c.trim().is_empty() => c,
        Ok(_) => return Outcome::err("the command is empty"),
        Err(e) => return Outcome::err(e),
    };
    let timeout = args
        .get("timeout_secs")
        .and_then(Value::as_f64)
        .filter(|s| *s > 0.0 && s.is_finite())
        .map(|s| Duration::from_secs_f64(s).min(MAX_BASH_TIMEOUT))
        .unwrap_or(default_timeout);
    let limits = Limits {
        timeout,
        output_limit: OUTPUT_LIMIT,
    };
    let (output, end) = match process::execute(ws.root(), command, limits, signal, None).await {
        Ok(done) => done,
        Err(e) => return Outcome::err(format!("could not run the command: {e}")),
    };
    let status = match end {
        End::Exited(c) => format!("[exit status {c}]"),
        End::Signaled(s) => format!("[killed by signal {s}]"),
        End::TimedOut(t) => format!("[timed out after {} s]", t.as_secs_f64()),
        End::Aborted => "[aborted]".to_string(),
    };
    let mut content = output;
    if !content.is_empty() && !content.ends_with('\n') {
        content.push('\n');
    }
    content.push_str(&status);
    match end {
        End::Exited(0) => Outcome::ok(content),
        End::Aborted => Outcome::aborted(content),
        _ => Outcome::err(content),
    }
}

fn read_text(path: &Path, shown: &str) -> Result<String, String> {
    let meta = fs::metadata(path).map_err(|e| format!("{shown}: {e}"))?;
    if meta.is_dir() {
        return Err(format!("{shown} is a directory; use list_files"));
    }
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(64 * 1024 * 1024).read_to_end(&mut bytes))
        .map_err(|e| format!("{shown}: {e}"))?;
    if bytes.iter().take(8192).any(|&b| b == 0) {
        return Err(format!("{shown} looks like a binary file"));
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn read_file(ws: &Workspace, args: &Value) -> Result<String, String> {
    let rel = str_arg(args, "path")?;
    let path = ws.existing(rel)?;
    let text = read_text(&path, rel)?;
    let offset = opt_u64(args, "offset").unwrap_or(1).max(1) as usize;
    let limit = opt_u64(args, "limit").map(|n| n as usize);
    let ranged = offset > 1 || limit.is_some();
    let text = if ranged {
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        let start = (offset - 1).min(lines.len());
        let end = limit.map_or(lines.len(), |n| (start + n).min(lines.len()));
        lines[start..end].concat()
    } else {
        text
    };
    let total = text.chars().count();
    if total <= OUTPUT_LIMIT {
        return Ok(text);
    }
    let mut cut: String = text.chars().take(OUTPUT_LIMIT).collect();
    let lines_shown = cut.matches('\n').count();
    cut.push_str(&format!(
        "\n[file truncated: showing {OUTPUT_LIMIT} of {total} characters; read more with offset={} and limit]",
        offset + lines_shown
    ));
    Ok(cut)
}

fn write_bytes(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.write_all(bytes)
}

fn write_file(ws: &Workspace, args: &Value) -> Result<String, String> {
    let rel = str_arg(args, "path")?;
    let content = str_arg(args, "content")?;
    let path = ws.for_write(rel)?;
    write_bytes(&path, content.as_bytes()).map_err(|e| format!("{rel}: {e}"))?;
    Ok(format!(
        "wrote {} bytes to {}",
        content.len(),
        ws.show(&path)
    ))
}

fn edit_file(ws: &Workspace, args: &Value) -> Result<String, String> {
    let rel = str_arg(args, "path")?;
    let old = str_arg(args, "old_string")?;
    let new = str_arg(args, "new_string")?;
    if old.is_empty() {
        return Err("old_string is empty; use write_file to create a file".to_string());
    }
    let path = ws.existing(rel)?;
    let text = read_text(&path, rel)?;
    let count = text.matches(old).count();
    match count {
        0 => Err(format!(
            "old_string was not found in {rel}; read the file and copy the text exactly"
        )),
        1 => {
            let updated = text.replacen(old, new, 1);
            write_bytes(&path, updated.as_bytes()).map_err(|e| format!("{rel}: {e}"))?;
            Ok(format!("edited {}: replaced 1 occurrence", ws.show(&path)))
        }
        n => Err(format!(
            "old_string occurs {n} times in {rel}; include more surrounding text so it occurs exactly once"
        )),
    }
}

fn list_files(ws: &Workspace, args: &Value) -> Result<String, String> {
    let rel = opt_str(args, "path").unwrap_or(".");
    let dir = ws.existing(rel)?;
    if !dir.is_dir() {
        return Err(format!("{rel} is not a directory"));
    }
    let recursive = opt_bool(args, "recursive");
    let mut out = Vec::new();
    let mut truncated = false;
    list_into(ws, &dir, recursive, &mut out, &mut truncated)?;
    if out.is_empty() {
        return Ok(format!("{rel} is empty"));
    }
    let mut text = out.join("\n");
    if truncated {
        text.push_str(&format!(
            "\n[listing truncated at {MAX_LIST_ENTRIES} entries]"
        ));
    }
    Ok(text)
}

fn sorted_entries(dir: &Path) -> std::io::Result<Vec<fs::DirEntry>> {
    let mut entries: Vec<fs::DirEntry> = fs::read_dir(dir)?.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    Ok(entries)
}

fn list_into(
    ws: &Workspace,
    dir: &Path,
    recursive: bool,
    out: &mut Vec<String>,
    truncated: &mut bool,
) -> Result<(), String> {
    let entries = sorted_entries(dir).map_err(|e| format!("{}: {e}", ws.show(dir)))?;
    for entry in entries {
        if out.len() >= MAX_LIST_ENTRIES {
            *truncated = true;
            return Ok(());
        }
        let path = entry.path();
        let shown = ws.show(&path);
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            out.push(format!("{shown}/"));
            let name = entry.file_name();
            if recursive && !SKIP_DIRS.iter().any(|s| name == *s) {
                list_into(ws, &path, recursive, out, truncated)?;
            }
        } else if kind.is_symlink() {
            out.push(format!("{shown}@"));
        } else {
            out.push(shown);
        }
    }
    Ok(())
}

fn grep(ws: &Workspace, args: &Value) -> Result<String, String> {
    let pattern = str_arg(args, "pattern")?;
    if pattern.is_empty() {
        return Err("the pattern is empty".to_string());
    }
    let rel = opt_str(args, "path").unwrap_or(".");
    let start = ws.existing(rel)?;
    let source = if opt_bool(args, "regex") {
        pattern.to_string()
    } else {
        regex::escape(pattern)
    };
    let re = regex::RegexBuilder::new(&source)
        .case_insensitive(opt_bool(args, "ignore_case"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("invalid pattern: {e}"))?;
    let mut files = Vec::new();
    collect_files(&start, &mut files);
    let mut matches = Vec::new();
    let mut more = false;
    'files: for file in &files {
        let Ok(meta) = fs::metadata(file) else {
            continue;
        };
        if meta.len() > MAX_GREP_FILE_BYTES {
            continue;
        }
        let Ok(bytes) = fs::read(file) else { continue };
        if bytes.iter().take(8192).any(|&b| b == 0) {
            continue;
        }
        let text = String::from_utf8_lossy(&bytes);
        for (i, line) in text.lines().enumerate() {
            if re.is_match(line) {
                if matches.len() >= MAX_GREP_MATCHES {
                    more = true;
                    break 'files;
                }
                let line: String = if line.chars().count() > MAX_LINE_CHARS {
                    let mut l: String = line.chars().take(MAX_LINE_CHARS).collect();
                    l.push('…');
                    l
                } else {
                    line.to_string()
                };
                matches.push(format!("{}:{}: {line}", ws.show(file), i + 1));
            }
        }
    }
    if matches.is_empty() {
        return Ok(format!("no matches for {pattern:?} in {rel}"));
    }
    let mut text = matches.join("\n");
    if more {
        text.push_str(&format!(
            "\n[more matches not shown: the first {MAX_GREP_MATCHES} are listed]"
        ));
    }
    Ok(text)
}

/// Regular files under `start` (or `start` itself), sorted, not following
/// symbolic links, skipping [`SKIP_DIRS`].
fn collect_files(start: &Path, out: &mut Vec<PathBuf>) {
    if out.len() >= MAX_GREP_FILES {
        return;
    }
    let Ok(meta) = fs::symlink_metadata(start) else {
        return;
    };
    if meta.is_file() {
        out.push(start.to_path_buf());
        return;
    }
    if !meta.is_dir() {
        return;
    }
    let Ok(entries) = sorted_entries(start) else {
        return;
    };
    for entry in entries {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let name = entry.file_name();
        if kind.is_dir() {
            if !SKIP_DIRS.iter().any(|s| name == *s) {
                collect_files(&entry.path(), out);
            }
        } else if kind.is_file() {
            if out.len() >= MAX_GREP_FILES {
                return;
            }
            out.push(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, tempfile::TempDir, Workspace) {
        let ws_dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret.txt"), "secret").unwrap();
        std::os::unix::fs::symlink(outside.path(), ws_dir.path().join("out")).unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("secret.txt"),
            ws_dir.path().join("secret-link"),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("nothing-yet"),
            ws_dir.path().join("dangling"),
        )
        .unwrap();
        fs::create_dir(ws_dir.path().join("sub")).unwrap();
        fs::write(ws_dir.path().join("sub/a.txt"), "alpha\nbeta\nalpha beta\n").unwrap();
        let ws = Workspace::new(ws_dir.path()).unwrap();
        (ws_dir, outside, ws)
    }

    #[test]
    fn paths_are_confined() {
        let (_d, outside, ws) = setup();
        for bad in ["/etc/passwd", "../x", "sub/../../x", "a\0b"] {
            assert!(ws.existing(bad).is_err(), "{bad}");
            assert!(ws.for_write(bad).is_err(), "{bad}");
        }
        assert!(
            ws.existing("out/secret.txt")
                .unwrap_err()
                .contains("outside")
        );
        assert!(ws.existing("secret-link").unwrap_err().contains("outside"));
        assert!(ws.for_write("out/new.txt").unwrap_err().contains("outside"));
        assert!(ws.for_write("secret-link").unwrap_err().contains("outside"));
        assert!(ws.for_write("dangling").is_err());
        assert!(ws.for_write("").is_err());
        assert!(ws.existing("sub/../sub/a.txt").is_ok());
        assert_eq!(
            ws.for_write("new/dir/f.txt").unwrap(),
            ws.root().join("new/dir/f.txt")
        );
        assert!(!outside.path().join("nothing-yet").exists());
    }

    #[test]
    fn file_tools() {
        let (_d, _o, ws) = setup();
        let w =
            |rel: &str, content: &str| write_file(&ws, &json!({"path": rel, "content": content}));
        w("n/notes.md", "one two two\n").unwrap();
        assert_eq!(
            read_file(&ws, &json!({"path": "n/notes.md"})).unwrap(),
            "one two two\n"
        );
        let e = |old: &str, new: &str| {
            edit_file(
                &ws,
                &json!({"path": "n/notes.md", "old_string": old, "new_string": new}),
            )
        };
        assert!(e("three", "x").unwrap_err().contains("not found"));
        assert!(e("two", "x").unwrap_err().contains("2 times"));
        e("one", "1").unwrap();
        assert_eq!(
            fs::read_to_string(ws.root().join("n/notes.md")).unwrap(),
            "1 two two\n"
        );
        assert_eq!(
            read_file(&ws, &json!({"path": "sub/a.txt", "offset": 2, "limit": 1})).unwrap(),
            "beta\n"
        );
        let listing = list_files(&ws, &json!({"recursive": true})).unwrap();
        assert!(listing.contains("sub/a.txt"), "{listing}");
        assert!(listing.contains("out@"), "{listing}");
        let g = grep(&ws, &json!({"pattern": "ALPHA", "ignore_case": true})).unwrap();
        assert_eq!(g, "sub/a.txt:1: alpha\nsub/a.txt:3: alpha beta");
        let g = grep(&ws, &json!({"pattern": "^beta$", "regex": true})).unwrap();
        assert_eq!(g, "sub/a.txt:2: beta");
        assert!(
            grep(&ws, &json!({"pattern": "secret"}))
                .unwrap()
                .starts_with("no matches")
        );
    }
}
