//! The web UI in a real browser: headless Chromium driven over WebDriver
//! (chromedriver on a loopback port, fantoccini as the client), against a
//! real `aishell serve`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them).
//! Missing, the tests fail and say so; `AISHELL_SKIP_BROWSER_TESTS=1` skips
//! them on a laptop without a browser. Screenshots of every page go to
//! `target/screenshots/`; with `AISHELL_UPDATE_DOCS_SCREENSHOTS=1` the chat
//! and dashboard ones are also copied into `docs/` for the README.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Gateway;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// One browser at a time: two cores cannot run four Chromiums and four
/// gateways at once without timeouts.
static BROWSER_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WAIT: Duration = Duration::from_secs(30);

// ---- browser harness ----------------------------------------------------------

struct Browser {
    client: Client,
    driver: Option<Child>,
    _profile: tempfile::TempDir,
}

fn skip_requested() -> bool {
    std::env::var("AISHELL_SKIP_BROWSER_TESTS").is_ok_and(|v| v == "1")
}

fn find_program(env: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        return p.exists().then_some(p);
    }
    for c in candidates {
        let path = Path::new(c);
        if path.is_absolute() {
            if path.exists() {
                return Some(path.to_path_buf());
            }
            continue;
        }
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let full = dir.join(c);
            if full.exists() {
                return Some(full);
            }
        }
    }
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free loopback port")
        .port()
}

impl Browser {
    /// Start chromedriver and a fresh headless Chromium; `None` when the
    /// user opted out with `AISHELL_SKIP_BROWSER_TESTS=1`.
    async fn start() -> Option<Browser> {
        if skip_requested() {
            eprintln!("AISHELL_SKIP_BROWSER_TESTS=1: skipping a browser test");
            return None;
        }
        let chromium = find_program(
            "AISHELL_CHROMIUM",
            &["chromium", "chromium-browser", "google-chrome"],
        )
        .unwrap_or_else(|| {
            panic!(
                "the web UI tests need Chromium: apt-get install chromium chromium-driver \
                 (or set AISHELL_CHROMIUM; AISHELL_SKIP_BROWSER_TESTS=1 skips these tests)"
            )
        });
        let chromedriver = find_program(
            "AISHELL_CHROMEDRIVER",
            &["chromedriver", "/usr/lib/chromium/chromedriver"],
        )
        .unwrap_or_else(|| {
            panic!(
                "the web UI tests need chromedriver: apt-get install chromium-driver \
                 (or set AISHELL_CHROMEDRIVER; AISHELL_SKIP_BROWSER_TESTS=1 skips these tests)"
            )
        });
        let port = free_port();
        let mut cmd = Command::new(&chromedriver);
        cmd.arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group, so Drop can kill the driver and every
        // browser process it started even when a test panics.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let driver = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let profile = tempfile::tempdir().expect("profile dir");
        let mut browser = BrowserStart {
            driver: Some(driver),
        };
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on {port} within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--no-first-run",
                    "--disable-dev-shm-usage",
                    "--window-size=1280,860",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("cannot start Chromium through chromedriver: {e}"));
        Some(Browser {
            client,
            driver: browser.driver.take(),
            _profile: profile,
        })
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigate");
    }

    async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Poll a JavaScript expression until it is truthy; returns its value.
    async fn wait_js(&self, what: &str, expr: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        let script = format!("return ({expr});");
        loop {
            let v = self.js(&script).await;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            if Instant::now() > deadline {
                let body = self
                    .js("return document.body.innerText")
                    .await
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                panic!("waited {WAIT:?} for {what} ({expr}); page text:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn text_of(&self, selector: &str) -> String {
        let sel = serde_json::to_string(selector).unwrap();
        self.js(&format!(
            "const e = document.querySelector({sel}); return e ? e.innerText : null;"
        ))
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    async fn click(&self, selector: &str) {
        self.client
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(selector))
            .await
            .unwrap_or_else(|e| panic!("no element {selector}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("cannot click {selector}: {e}"));
    }

    async fn type_into(&self, selector: &str, keys: &str) {
        self.client
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(selector))
            .await
            .unwrap_or_else(|e| panic!("no element {selector}: {e}"))
            .send_keys(keys)
            .await
            .unwrap_or_else(|e| panic!("cannot type into {selector}: {e}"));
    }

    /// Save a PNG of the page under `target/screenshots/NAME.png`.
    async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        let dir = screenshots_dir();
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, &png).expect("write screenshot");
        // The README shows the chat page and the dashboard.
        let for_readme = ["chat", "admin"].contains(&name);
        if for_readme && std::env::var("AISHELL_UPDATE_DOCS_SCREENSHOTS").is_ok_and(|v| v == "1") {
            let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs");
            std::fs::create_dir_all(&docs).expect("docs dir");
            std::fs::write(docs.join(format!("{name}.png")), &png).expect("copy screenshot");
        }
        path
    }

    /// The page threw nothing uncaught.
    async fn assert_no_page_errors(&self) {
        let errors = self.js("return window.aishellErrors || []").await;
        assert_eq!(errors, json!([]), "uncaught errors in the page");
    }

    async fn close(mut self) {
        let _ = self.client.clone().close().await;
        if let Some(mut d) = self.driver.take() {
            kill_group(&mut d);
        }
    }
}

/// Kills chromedriver's group if `Browser::start` fails half-way.
struct BrowserStart {
    driver: Option<Child>,
}

impl Drop for BrowserStart {
    fn drop(&mut self) {
        if let Some(mut d) = self.driver.take() {
            kill_group(&mut d);
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(mut d) = self.driver.take() {
            kill_group(&mut d);
        }
    }
}

fn kill_group(child: &mut Child) {
    let pid = child.id() as i32;
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = child.wait();
}

fn screenshots_dir() -> PathBuf {
    // target/tmp → target/screenshots
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("screenshots")
}

fn login_url(gw: &Gateway, path: &str, token: &str) -> String {
    gw.http_url(&format!("{path}?token={token}"))
}

/// JavaScript: the page is connected (its `session` frame arrived).
const CONNECTED: &str = "document.querySelector('#status').classList.contains('status-ok') && window.aishell && window.aishell.state.sessionId";
/// JavaScript: the latest turn on screen has finished.
const TURN_DONE: &str = "(() => { const t = [...document.querySelectorAll('.turn')].pop(); return t && t.classList.contains('done'); })()";

// ---- tests ---------------------------------------------------------------------

/// The printed URL logs in (and the token leaves the address bar); a message
/// streams its reply, shows the tool call with a collapsible result and the
/// usage; Shift+Enter is a newline; the files panel lists and shows a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_page_logs_in_streams_a_reply_and_shows_the_tool_call() {
    let _one = BROWSER_LOCK.lock().await;
    let Some(b) = Browser::start().await else {
        return;
    };
    let gw = Gateway::start(&[]);
    b.goto(&login_url(&gw, "/", &gw.token)).await;
    b.wait_js("the page to connect", CONNECTED).await;
    let url = b.client.current_url().await.unwrap();
    assert!(
        !url.as_str().contains("token"),
        "the token stays in the address bar: {url}"
    );
    let stored = b.js("return sessionStorage.getItem('aishell.token')").await;
    assert_eq!(stored.as_str(), Some(gw.token.as_str()));
    let first_status = b.text_of("#status").await;
    assert!(first_status.contains("connected"), "status: {first_status}");

    // A first-time user is told what the agent does and what to try.
    b.wait_js(
        "the first-steps hint",
        "(document.querySelector('#empty .hint') || {}).innerText?.includes('shell agent')",
    )
    .await;
    b.click("#empty .example").await;
    assert_eq!(
        b.js("return document.querySelector('#input').value").await,
        json!("ls -la")
    );
    b.js("document.querySelector('#input').value = ''").await;

    // Shift+Enter: a newline in the box, not a send.
    b.type_into(
        "#input",
        "echo hello-from-the-browser > greeting.txt\u{E008}\u{E007}\u{E000}cat greeting.txt; echo line-two",
    )
    .await;
    let typed = b.js("return document.querySelector('#input').value").await;
    assert_eq!(
        typed.as_str(),
        Some("echo hello-from-the-browser > greeting.txt\ncat greeting.txt; echo line-two"),
        "Shift+Enter must insert a newline"
    );
    assert_eq!(
        b.js("return document.querySelectorAll('.turn').length")
            .await,
        json!(0)
    );
    // Enter sends.
    b.type_into("#input", "\u{E007}").await;
    b.wait_js("the turn to finish", TURN_DONE).await;
    let tool = b.text_of(".tool[data-tool=shell] .tool-input").await;
    assert!(
        tool.contains("echo hello-from-the-browser"),
        "tool input: {tool}"
    );
    let reply = b.text_of(".turn .assistant").await;
    assert!(reply.contains("hello-from-the-browser"), "reply: {reply}");
    assert!(reply.contains("line-two"), "reply: {reply}");
    assert!(
        b.js("return window.aishell.stats.deltas").await.as_u64() >= Some(1),
        "the reply did not arrive as streamed deltas"
    );
    let usage = b.text_of(".turn .usage").await;
    assert!(usage.contains("done"), "usage: {usage}");
    // The output is shown once (inside the tool), not again as reply text;
    // a short result starts open and folds on a click.
    assert_eq!(
        reply.matches("hello-from-the-browser\nline-two").count(),
        1,
        "reply: {reply}"
    );
    let result = b.text_of(".tool-result pre").await;
    assert!(result.contains("line-two"), "tool result: {result}");
    assert_eq!(
        b.js("return document.querySelector('.tool-result').open")
            .await,
        json!(true)
    );
    b.click(".tool-result summary").await;
    assert_eq!(
        b.js("return document.querySelector('.tool-result').open")
            .await,
        json!(false)
    );
    b.click(".tool-result summary").await;
    assert!(
        b.text_of("#conversations").await.contains("echo hello"),
        "the conversation is listed"
    );
    assert!(
        b.text_of("#status").await.contains("ready"),
        "status after the first turn: {}",
        b.text_of("#status").await
    );

    // Files panel: the file the command wrote is listed and can be viewed.
    b.click("#toggle-files").await;
    b.wait_js(
        "greeting.txt in the files panel",
        "document.querySelector('#files-list li[data-name=\"greeting.txt\"]')",
    )
    .await;
    b.click("#files-list li[data-name=\"greeting.txt\"] .file")
        .await;
    b.wait_js(
        "the file viewer",
        "((document.querySelector('#viewer-body pre') || {}).innerText || '').includes('hello-from-the-browser')",
    )
    .await;
    b.screenshot("chat").await;

    // Upload (the file picker's change event, with a file made in the page),
    // then delete.
    b.js("const dt = new DataTransfer(); dt.items.add(new File(['uploaded from the page\\n'], 'upload.txt')); const i = document.querySelector('#files-upload'); i.files = dt.files; i.dispatchEvent(new Event('change'));").await;
    b.wait_js(
        "upload.txt in the files panel",
        "document.querySelector('#files-list li[data-name=\"upload.txt\"]')",
    )
    .await;
    assert_eq!(
        common::read(&gw.workspace("local").join("upload.txt")),
        "uploaded from the page\n"
    );
    b.click("#files-list li[data-name=\"upload.txt\"] button[aria-label=\"Delete upload.txt\"]")
        .await;
    b.wait_js(
        "upload.txt to be gone",
        "!document.querySelector('#files-list li[data-name=\"upload.txt\"]')",
    )
    .await;
    assert!(!gw.workspace("local").join("upload.txt").exists());

    // Conversations: a new one, switch back, delete it.
    let first = b.js("return window.aishell.state.current").await;
    b.click("#new-conversation").await;
    b.type_into("#input", "echo second-conversation\u{E007}")
        .await;
    b.wait_js("the second turn to finish", TURN_DONE).await;
    b.wait_js(
        "two conversations listed",
        "document.querySelectorAll('#conversations li').length === 2",
    )
    .await;
    let second = b.js("return window.aishell.state.current").await;
    assert_ne!(first, second);
    b.click(&format!(
        "#conversations li[data-conversation={}] .conversation",
        first.as_str().unwrap()
    ))
    .await;
    let shown = b.text_of("#messages").await;
    assert!(
        shown.contains("hello-from-the-browser") && !shown.contains("second-conversation"),
        "after switching back: {shown}"
    );
    b.click(&format!(
        "#conversations li[data-conversation={}] .delete",
        second.as_str().unwrap()
    ))
    .await;
    b.wait_js(
        "one conversation left",
        "document.querySelectorAll('#conversations li').length === 1",
    )
    .await;
    assert_eq!(b.js("return window.aishell.state.current").await, first);

    // A new tab (its own session storage) picks up the same session and
    // shows the conversation from the store.
    let sid = b.js("return window.aishell.state.sessionId").await;
    let first_tab = b.client.window().await.unwrap();
    let tab = b.client.new_window(true).await.unwrap();
    b.client.switch_to_window(tab.handle).await.unwrap();
    b.goto(&login_url(&gw, "/", &gw.token)).await;
    b.wait_js("the new tab to connect", CONNECTED).await;
    assert_eq!(b.js("return window.aishell.state.sessionId").await, sid);
    b.wait_js(
        "the stored conversation in the new tab's list",
        "document.querySelector('#conversations').innerText.includes('echo hello-from-the-browser')",
    )
    .await;
    b.click("#conversations li .conversation").await;
    b.wait_js(
        "the stored reply",
        "document.querySelector('#messages').innerText.includes('line-two')",
    )
    .await;
    b.assert_no_page_errors().await;
    b.client.close_window().await.unwrap();
    b.client.switch_to_window(first_tab).await.unwrap();

    // Phone width: the conversation list folds away; the chat still works.
    b.client.set_window_size(390, 800).await.unwrap();
    b.click("#viewer-close").await;
    b.click("#files-close").await;
    b.wait_js(
        "the sidebar to fold away at phone width",
        "document.querySelector('#sidebar').getBoundingClientRect().right <= 0",
    )
    .await;
    b.screenshot("chat-phone").await;
    b.assert_no_page_errors().await;
    b.close().await;
}

/// A turn that ends in an error says "failed" under its red card (not
/// "done"), and the files panel shows aishell's own `.aishell/` folder
/// without offering to delete it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_page_marks_failed_turns_and_keeps_its_own_folder() {
    let _one = BROWSER_LOCK.lock().await;
    let Some(b) = Browser::start().await else {
        return;
    };
    // An llm agent whose endpoint answers nothing: every turn fails.
    let gw = Gateway::start(&[
        "--agent",
        "llm",
        "--llm-base-url",
        "http://127.0.0.1:9/v1",
        "--llm-model",
        "none",
    ]);
    b.goto(&login_url(&gw, "/", &gw.token)).await;
    b.wait_js("the page to connect", CONNECTED).await;
    b.type_into("#input", "hello\u{E007}").await;
    b.wait_js("the turn to finish", TURN_DONE).await;
    b.wait_js(
        "the error card",
        "document.querySelector('.turn .banner-error')",
    )
    .await;
    let footer = b.text_of(".turn .usage").await;
    assert!(
        footer.starts_with("failed") && !footer.contains("done"),
        "footer under an error: {footer}"
    );

    let workspace = gw.workspace("local");
    std::fs::create_dir_all(workspace.join(".aishell/llm")).unwrap();
    std::fs::write(workspace.join("mine.txt"), "a user's file\n").unwrap();
    b.click("#toggle-files").await;
    b.wait_js(
        "the workspace listing",
        "document.querySelector('#files-list li[data-name=\"mine.txt\"]') && document.querySelector('#files-list li[data-name=\".aishell\"]')",
    )
    .await;
    assert_eq!(
        b.js("return !!document.querySelector('#files-list li[data-name=\".aishell\"] button[aria-label^=Delete]')")
            .await,
        json!(false),
        "no delete button on .aishell/"
    );
    assert_eq!(
        b.js("return !!document.querySelector('#files-list li[data-name=\"mine.txt\"] button[aria-label^=Delete]')")
            .await,
        json!(true),
        "a user's own file can still be deleted"
    );
    b.assert_no_page_errors().await;
    b.close().await;
}

/// Mid-stream, the client socket drops and later the gateway itself is
/// killed and restarted: the page reconnects with session_id + last_seq and
/// every delta is on screen exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_page_reconnects_and_resumes_without_losing_or_doubling_deltas() {
    let _one = BROWSER_LOCK.lock().await;
    let Some(b) = Browser::start().await else {
        return;
    };
    let mut gw = Gateway::start(&["--agent", "echo"]);
    b.goto(&login_url(&gw, "/", &gw.token)).await;
    b.wait_js("the page to connect", CONNECTED).await;

    const N: usize = 20_000;
    let expected: String = (0..N).map(|i| format!("chunk-{i} ")).collect();

    // 1. The socket drops (as a network failure would).
    b.type_into("#input", &format!("/stream {N}\u{E007}")).await;
    b.wait_js(
        "the stream to start",
        "window.aishell.deltaText().includes('chunk-20 ')",
    )
    .await;
    let before = b
        .js("window.aishell.dropSocket(); return window.aishell.deltaText().length")
        .await;
    eprintln!(
        "socket dropped after {before} of {} bytes of deltas",
        expected.len()
    );
    assert!(
        before.as_u64() < Some(expected.len() as u64),
        "the whole stream arrived before the drop; the test did not test a resume"
    );
    b.wait_js(
        "the reconnect banner",
        "!document.querySelector('#conn-banner').hidden",
    )
    .await;
    let banner = b.text_of("#conn-banner").await;
    assert!(banner.contains("Reconnect now"), "banner: {banner}");
    b.wait_js("the turn to finish", TURN_DONE).await;
    let got = b.js("return window.aishell.deltaText()").await;
    assert_eq!(
        got.as_str().map(str::len),
        Some(expected.len()),
        "deltas lost or doubled after a socket drop"
    );
    assert!(
        got.as_str() == Some(expected.as_str()),
        "deltas out of order"
    );
    let resumes = b.js("return window.aishell.stats.resumes").await;
    assert!(
        resumes.as_u64() >= Some(1),
        "the page did not resume: {resumes}"
    );

    // 2. The gateway is killed (SIGKILL) mid-stream and restarted.
    b.click("#new-conversation").await;
    b.type_into("#input", &format!("/stream {N}\u{E007}")).await;
    b.wait_js(
        "the second stream to start",
        "window.aishell.deltaText().includes('chunk-20 ')",
    )
    .await;
    let before = b.js("return window.aishell.deltaText().length").await;
    gw.kill9();
    eprintln!(
        "gateway killed after {before} of {} bytes of deltas",
        expected.len()
    );
    assert!(
        before.as_u64() < Some(expected.len() as u64),
        "the whole stream arrived before the kill; the test did not test a resume"
    );
    b.wait_js(
        "the page to notice the gateway is gone",
        "!document.querySelector('#conn-banner').hidden",
    )
    .await;
    gw.restart(&[]);
    // Backoff is 2 s, then 4 s: "Reconnect now" skips the wait (unless the
    // page got back on its own meanwhile).
    b.js("if (!document.querySelector('#conn-banner').hidden) document.querySelector('#reconnect-now').click()").await;
    b.wait_js("the page to reconnect", CONNECTED).await;
    b.wait_js("the second turn to finish", TURN_DONE).await;
    let got = b.js("return window.aishell.deltaText()").await;
    let got = got.as_str().unwrap_or_default();
    for i in [0, 1, 20, 21, N / 2, N - 1] {
        let chunk = format!("chunk-{i} ");
        assert_eq!(
            got.matches(&chunk).count(),
            1,
            "{chunk:?} should be on screen exactly once"
        );
    }
    assert_eq!(
        got.len(),
        expected.len(),
        "deltas lost or doubled across a gateway restart"
    );
    assert!(
        got == expected,
        "deltas out of order across a gateway restart"
    );
    let on_screen = b.text_of(".turn:last-of-type .assistant .text").await;
    assert_eq!(on_screen.trim_end(), expected.trim_end());
    // The view followed the stream to its end.
    b.wait_js(
        "the transcript scrolled to the end",
        "(() => { const m = document.querySelector('#messages'); return m.scrollHeight - m.scrollTop - m.clientHeight < 80; })()",
    )
    .await;
    b.screenshot("chat-resumed").await;

    // 3. A reload resumes from session storage: same session, same
    // transcript, nothing replayed twice.
    let sid = b.js("return window.aishell.state.sessionId").await;
    b.client.refresh().await.expect("reload");
    b.wait_js("the page to reconnect after a reload", CONNECTED)
        .await;
    assert_eq!(b.js("return window.aishell.state.sessionId").await, sid);
    let got = b.js("return window.aishell.deltaText()").await;
    assert!(
        got.as_str() == Some(expected.as_str()),
        "transcript changed across a reload"
    );
    assert_eq!(
        b.js("return document.querySelectorAll('.turn').length")
            .await,
        json!(1)
    );
    b.assert_no_page_errors().await;
    b.close().await;
}

/// An agent question shows as a prompt with its options; clicking one
/// answers it. With no warm pool the page says a new sandbox is starting and
/// roughly how long it takes; after an admin stops the sandbox, the next
/// message brings it back and the page says the session was restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_page_answers_an_agent_question_and_explains_starts_and_restores() {
    let _one = BROWSER_LOCK.lock().await;
    let Some(b) = Browser::start().await else {
        return;
    };
    let gw = Gateway::start(&["--agent", "echo", "--enable-warm-pool", "false"]);
    b.goto(&login_url(&gw, "/", &gw.token)).await;
    b.wait_js("the page to connect", CONNECTED).await;
    b.type_into("#input", "/ask Deploy to production?\u{E007}")
        .await;
    b.wait_js(
        "the question prompt",
        "document.querySelectorAll('.question .option').length === 2",
    )
    .await;
    let question = b.text_of(".question-text").await;
    assert!(
        question.contains("Deploy to production?"),
        "question: {question}"
    );
    assert!(
        b.text_of(".turn-footer")
            .await
            .contains("waiting for your answer")
    );
    let history = b.js("return window.aishell.stats.statusHistory").await;
    assert!(
        history.as_array().unwrap().iter().any(|s| s
            .as_str()
            .unwrap_or_default()
            .starts_with("starting a new sandbox (about ")),
        "no cold-start status with an estimate: {history}"
    );
    b.screenshot("chat-question").await;
    b.click(".question .option:first-child").await;
    b.wait_js("the turn to finish", TURN_DONE).await;
    let reply = b.text_of(".turn .assistant").await;
    assert!(reply.contains("you answered: yes"), "reply: {reply}");
    assert!(
        reply.contains("You answered: yes"),
        "the prompt shows the answer: {reply}"
    );

    // An admin stops the sandbox; the page says so; the next message restarts it.
    let sid = b.js("return window.aishell.state.sessionId").await;
    let sid = sid.as_str().unwrap().to_string();
    let (status, body) = gw.http(
        "POST",
        &format!("/api/admin/sessions/{sid}/stop"),
        Some(&gw.token),
        None,
    );
    assert_eq!(status, 202, "{body}");
    b.wait_js(
        "the stopped status",
        "document.querySelector('#status').innerText.includes('sandbox stopped')",
    )
    .await;
    b.type_into("#input", "hello again\u{E007}").await;
    b.wait_js(
        "the restored status",
        "document.querySelector('#status').innerText.includes('restored your session')",
    )
    .await;
    b.wait_js("the second turn to finish", TURN_DONE).await;
    assert!(
        b.text_of(".turn:last-of-type .assistant")
            .await
            .contains("hello again")
    );

    // Stop aborts the running turn.
    b.type_into("#input", "/sleep 60000\u{E007}").await;
    b.wait_js(
        "the Stop button",
        "!document.querySelector('#abort').hidden",
    )
    .await;
    b.click("#abort").await;
    b.wait_js("the aborted turn to end", TURN_DONE).await;
    let aborted = b.text_of(".turn:last-of-type .assistant").await;
    assert!(aborted.contains("ABORTED"), "aborted turn: {aborted}");
    assert_eq!(
        b.js("return document.querySelector('#abort').hidden").await,
        json!(true)
    );

    // The reconnect schedule: 2, 4, 8, 16, 30 s, then every 30 s, ±10 %.
    let delays = b
        .js("return [0,1,2,3,4,5,6,7].map(a => window.aishell.reconnectDelayMs(a))")
        .await;
    let delays: Vec<f64> = delays
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (got, want) in delays
        .iter()
        .zip([2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0])
    {
        let want = want * 1000.0;
        assert!(
            (want * 0.9..=want * 1.1).contains(got),
            "reconnect delays {delays:?}"
        );
    }
    b.assert_no_page_errors().await;
    b.close().await;
}

/// A token that expires while the page is open: the gateway closes with
/// UNAUTHORIZED, and the page stops retrying and asks for a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_page_stops_retrying_and_asks_for_a_token_when_its_token_expires() {
    let _one = BROWSER_LOCK.lock().await;
    let Some(b) = Browser::start().await else {
        return;
    };
    const SECRET: &str = "web-ui-test-secret";
    let gw = Gateway::start(&["--agent", "echo", "--jwt-secret", SECRET]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({ "sub": "carol", "exp": now + 4 });
    let jwt = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap();
    b.goto(&login_url(&gw, "/", &jwt)).await;
    b.wait_js("the page to connect", CONNECTED).await;
    assert_eq!(b.text_of("#user").await, "carol");
    b.wait_js(
        "the token prompt after expiry",
        "!document.querySelector('#login').hidden",
    )
    .await;
    let why = b.text_of("#login-message").await;
    assert!(why.contains("expired"), "login message: {why}");
    // No retry loop behind the prompt.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(b.js("return window.aishell.stats.connects").await, json!(1));
    assert_eq!(
        b.js("return sessionStorage.getItem('aishell.token')").await,
        Value::Null,
        "the refused token is forgotten"
    );
    b.assert_no_page_errors().await;
    b.close().await;
}

/// A gateway that stops answering (frozen: the socket stays open but nothing
/// comes back) is noticed by the heartbeat: no pong within 10 s and the page
/// reconnects on a new socket, then carries on once the gateway is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_page_heartbeat_notices_a_frozen_gateway_and_reconnects() {
    let _one = BROWSER_LOCK.lock().await;
    let Some(b) = Browser::start().await else {
        return;
    };
    let gw = Gateway::start(&["--agent", "echo"]);
    b.goto(&login_url(&gw, "/", &gw.token)).await;
    b.wait_js("the page to connect", CONNECTED).await;
    b.js("window.aishell.pingNow()").await;
    b.wait_js("a pong", "window.aishell.stats.pongs >= 1").await;

    let pid = nix::unistd::Pid::from_raw(gw.pid() as i32);
    /// Thaws the gateway even if an assertion below fails.
    struct Thaw(nix::unistd::Pid);
    impl Drop for Thaw {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
        }
    }
    let thaw = Thaw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let frozen_at = Instant::now();
    b.js("window.aishell.pingNow()").await;
    b.wait_js(
        "the heartbeat to give up on the socket",
        "window.aishell.stats.heartbeatTimeouts === 1 && !document.querySelector('#conn-banner').hidden",
    )
    .await;
    let waited = frozen_at.elapsed();
    drop(thaw);
    assert!(
        waited >= Duration::from_secs(9),
        "gave up after {waited:?}, before the 10 s pong deadline"
    );
    b.js("if (!document.querySelector('#conn-banner').hidden) document.querySelector('#reconnect-now').click()").await;
    b.wait_js("the page to reconnect", CONNECTED).await;
    b.type_into("#input", "still here\u{E007}").await;
    b.wait_js("the turn to finish", TURN_DONE).await;
    assert!(b.text_of(".turn .assistant").await.contains("still here"));

    // A session the gateway does not know (4404): the page starts a new one
    // and says so, keeping the transcript on screen.
    b.js("const s = JSON.parse(sessionStorage.getItem('aishell.chat')); s.sessionId = 's-doesnotexist'; sessionStorage.setItem('aishell.chat', JSON.stringify(s)); window.removeEventListener('pagehide', window.aishell.save); location.reload();").await;
    b.wait_js(
        "a new session",
        "window.aishell && window.aishell.state.sessionId && window.aishell.state.sessionId !== 's-doesnotexist' && document.querySelector('#status').classList.contains('status-ok')",
    )
    .await;
    assert!(b.text_of("#messages").await.contains("no longer exists"));
    assert!(b.text_of(".turn .assistant").await.contains("still here"));
    b.assert_no_page_errors().await;
    b.close().await;
}

/// The dashboard shows the session and the warm pool and can resize the
/// pool; a non-admin gets 403 (page and API), no token 401, and a bad token
/// makes the chat page ask for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_dashboard_shows_sessions_and_pool_and_refuses_non_admins() {
    let _one = BROWSER_LOCK.lock().await;
    let Some(b) = Browser::start().await else {
        return;
    };
    // One warm claim per user, so bob's second session starts cold.
    let gw = Gateway::start(&[
        "--warm-pool-target-size",
        "2",
        "--max-warm-claims-per-user",
        "1",
        "--log-file",
    ]);
    let bob = gw.create_token("bob");

    // API: 401 without a token, 403 for a non-admin, 200 for the admin.
    assert_eq!(gw.http("GET", "/api/admin/overview", None, None).0, 401);
    let (status, body) = gw.http("GET", "/api/admin/overview", Some(&bob), None);
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "FORBIDDEN");
    let (status, _) = gw.http(
        "POST",
        "/api/admin/pool",
        Some(&bob),
        Some(r#"{"action":"drain"}"#),
    );
    assert_eq!(status, 403);
    assert_eq!(
        gw.http("GET", "/api/me", Some(&bob), None).1["admin"],
        false
    );

    // A session with a turn, from the chat page (a warm claim).
    gw.wait_pool_ready(2, WAIT).await;
    b.goto(&login_url(&gw, "/", &gw.token)).await;
    b.wait_js("the page to connect", CONNECTED).await;
    b.type_into("#input", "echo dashboard-test\u{E007}").await;
    b.wait_js("the turn to finish", TURN_DONE).await;
    let sid = b.js("return window.aishell.state.sessionId").await;
    let sid = sid.as_str().expect("session id").to_string();
    assert!(
        b.js("return !document.querySelector('#admin-link').hidden")
            .await
            == json!(true),
        "admins see the dashboard link"
    );

    // A second user, over a plain WebSocket client.
    gw.wait_pool_ready(2, WAIT).await;
    let mut bob_ws = gw.connect_as(&bob, None).await.expect("bob connects");
    bob_ws.message("b1", "echo hello from bob").await;
    bob_ws.turn().await;
    let mut bob_cold = gw.connect_as(&bob, None).await.expect("bob connects again");
    bob_cold.message("b2", "echo a cold start").await;
    bob_cold.turn().await;
    // A refused connection counts as an UNAUTHORIZED error.
    assert!(gw.connect_as("ais_not_a_real_token", None).await.is_err());

    b.assert_no_page_errors().await;

    // Same tab: the token is already in session storage.
    b.goto(&gw.http_url("/admin")).await;
    let row = format!("#sessions-table tr[data-session=\"{sid}\"]");
    b.wait_js(
        "the session on the dashboard",
        &format!(
            "document.querySelector({})",
            serde_json::to_string(&row).unwrap()
        ),
    )
    .await;
    b.wait_js(
        "the pool refilled to 2 ready",
        "document.querySelector('#pool-ready').innerText === '2'",
    )
    .await;
    b.wait_js(
        "both users in the per-user table",
        "document.querySelector('#users-table tr[data-user=\"bob\"]') && document.querySelector('#users-table tr[data-user=\"local\"]')",
    )
    .await;
    assert_eq!(
        b.text_of("#pool-hit").await,
        "2",
        "both turns claimed a warm task"
    );
    assert!(b.text_of("#sessions-by-state").await.contains("RUNNING"));
    b.wait_js(
        "the warm start latency chart",
        "document.querySelectorAll('#chart-warm circle').length >= 1",
    )
    .await;
    b.wait_js(
        "the first-event latency chart",
        "document.querySelectorAll('#chart-first circle').length >= 1",
    )
    .await;
    b.wait_js(
        "the cold start latency chart",
        "document.querySelectorAll('#chart-cold circle').length >= 1",
    )
    .await;
    b.wait_js(
        "the refused connection among the errors",
        "document.querySelector('#errors-table tr[data-code=UNAUTHORIZED]')",
    )
    .await;
    // A chart's top label is the measured maximum, the figure its legend
    // gives (not the scale's headroom above it).
    let labels = b
        .js("const c = document.querySelector('#chart-warm'); return [c.querySelector('.axis-max').textContent, [...c.querySelectorAll('.chart-legend span')].pop().textContent]")
        .await;
    assert_eq!(
        format!("max {}", labels[0].as_str().unwrap_or_default()),
        labels[1].as_str().unwrap_or_default(),
        "axis and legend: {labels}"
    );
    // Two warm runners and the three sessions'.
    b.wait_js(
        "5 runners connected",
        "document.querySelector('#runners').innerText === '5'",
    )
    .await;
    b.screenshot("admin").await;

    // Today's report, one click away (a new tab).
    let dashboard = b.client.window().await.unwrap();
    b.click("#open-report").await;
    let deadline = Instant::now() + WAIT;
    let report_tab = loop {
        let all = b.client.windows().await.unwrap();
        if let Some(w) = all.into_iter().find(|w| *w != dashboard) {
            break w;
        }
        assert!(Instant::now() < deadline, "the report tab did not open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    b.client.switch_to_window(report_tab).await.unwrap();
    b.wait_js(
        "the daily report",
        "document.body && document.body.innerText.includes('aishell daily report')",
    )
    .await;
    // The report counts the errors the dashboard counts, from the same events.
    let report_text = b.text_of("body").await;
    assert!(
        report_text.contains("UNAUTHORIZED"),
        "the dashboard's UNAUTHORIZED is in the report's errors by code: {report_text}"
    );
    // Its inline CSS applies (the blob document inherits the dashboard's CSP).
    let styled = b
        .js("return getComputedStyle(document.body).fontFamily")
        .await;
    assert!(
        !styled.as_str().unwrap_or_default().contains("Times"),
        "the report is unstyled: {styled}"
    );
    b.screenshot("admin-report").await;
    b.client.close_window().await.unwrap();
    b.client.switch_to_window(dashboard).await.unwrap();

    // Resize the pool from the page.
    b.js("document.querySelector('#pool-new-target').value = '1'")
        .await;
    b.click("#pool-form button[type=submit]").await;
    b.wait_js(
        "the pool target to change",
        "document.querySelector('#pool-target').innerText === '1'",
    )
    .await;
    assert_eq!(gw.pool()["target"], 1);

    // Stop the session's task from the page.
    b.click(&format!("{row} button.danger")).await;
    // A stop may take the backend's whole stop deadline (15 s) on a loaded
    // machine; seen once past WAIT in CI with Chromium and cargo running.
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let (_, list) = gw.http("GET", "/api/sessions", Some(&gw.token), None);
        let state = list["sessions"]
            .as_array()
            .and_then(|l| l.iter().find(|s| s["session_id"] == sid.as_str()))
            .map(|s| s["state"].clone());
        if state == Some(json!("STOPPED")) {
            break;
        }
        assert!(Instant::now() < deadline, "session not stopped: {state:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Drain the pool from the page (two clicks: it stops every ready sandbox).
    b.click("#pool-drain").await;
    b.click("#pool-drain").await;
    b.wait_js(
        "the pool to drain",
        "document.querySelector('#pool-ready').innerText === '0' && document.querySelector('#pool-target').innerText === '0'",
    )
    .await;
    assert_eq!(gw.pool()["ready"], 0);
    b.assert_no_page_errors().await;

    // A non-admin opening the dashboard is told 403.
    b.goto(&login_url(&gw, "/admin", &bob)).await;
    b.wait_js(
        "the 403 message",
        "!document.querySelector('#admin-error').hidden",
    )
    .await;
    let error = b.text_of("#admin-error").await;
    assert!(
        error.contains("403") && error.contains("FORBIDDEN"),
        "{error}"
    );
    assert_eq!(
        b.js("return document.querySelector('#dashboard').hidden")
            .await,
        json!(true)
    );
    b.screenshot("admin-forbidden").await;

    // A token the gateway refuses: the chat page stops and asks for one.
    b.goto(&login_url(&gw, "/", "ais_not_a_real_token")).await;
    b.wait_js(
        "the token prompt",
        "!document.querySelector('#login').hidden",
    )
    .await;
    assert!(
        b.text_of("#login-message")
            .await
            .contains("does not accept")
    );
    b.assert_no_page_errors().await;
    b.close().await;
}
