//! The web client in a real browser: headless Chromium from the system's packages
//! (`/usr/bin/chromium`, driven through `/usr/bin/chromedriver` over WebDriver), against real
//! nodes. Each person is a separate browser with its own profile. The tests run one at a time
//! (a lock) to keep the machine's cores for the browsers, and save PNG screenshots of the main
//! screens to `<target dir>/web-screenshots/`. Without Chromium they print why and pass.
//!
//! Must-shows of issue 14, in order: 1 two friends chat; 5 hostile bodies stay text, and a
//! WebSocket from a foreign `Origin` is refused; 2 a closed tab goes offline and a reopened
//! one comes back from IndexedDB plus `sync`; 3 a group of three; 4 the page's node is killed
//! while a message is pending.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chat_tests::{TestCluster, TestNode};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const WAIT: Duration = Duration::from_secs(30);

/// One browser test at a time: each runs two or three Chromiums.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn have_chromium() -> bool {
    let ok = Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists();
    if !ok {
        println!(
            "SKIPPED: the browser tests need {CHROMIUM} and {CHROMEDRIVER} \
             (apt-get install chromium chromium-driver; .ci/run installs them)"
        );
    }
    ok
}

/// `<target dir>/web-screenshots`.
fn screenshot_dir() -> PathBuf {
    // target/<profile>/deps/web-<hash>
    let exe = std::env::current_exe().unwrap();
    let dir = exe.ancestors().nth(3).unwrap().join("web-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A chromedriver process on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(r) = reqwest::get(format!("{url}/status")).await {
                if r.status().is_success() {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Driver { child, url }
    }

    /// A new browser (its own Chromium and profile: one person's "browser context").
    async fn browser(&self, who: &str) -> Page {
        let profile = tempfile::tempdir().unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1100,720",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        // Leave any dialog open, so that a test can ask whether one opened.
        caps.insert("unhandledPromptBehavior".into(), json!("ignore"));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a WebDriver session");
        Page {
            c: client,
            who: who.into(),
            _profile: profile,
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One person's browser, on one page of the web client.
struct Page {
    c: Client,
    who: String,
    _profile: tempfile::TempDir,
}

impl Drop for Page {
    /// The WebDriver session is not ended on a failed test, and chromedriver leaves its
    /// browsers running when it is killed: stop the Chromium processes of this page's own
    /// profile (found by their `--user-data-dir`, which no other process uses).
    fn drop(&mut self) {
        let flag = format!("--user-data-dir={}", self._profile.path().display());
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            if cmdline.split(|&b| b == 0).any(|arg| arg == flag.as_bytes()) {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
    }
}

impl Page {
    async fn open(&self, base: &str) {
        self.c.goto(&format!("{base}/")).await.unwrap();
    }

    async fn js(&self, script: &str) -> Value {
        self.c.execute(script, vec![]).await.unwrap()
    }

    /// Waits until the JavaScript expression `expr` is truthy on the page.
    async fn until(&self, expr: &str, what: &str) {
        let deadline = Instant::now() + WAIT;
        let script = format!("return !!({expr});");
        loop {
            if let Ok(v) = self.c.execute(&script, vec![]).await {
                if v.as_bool() == Some(true) {
                    return;
                }
            }
            if Instant::now() > deadline {
                let state = self
                    .js("return document.getElementById('conn-state').textContent + ' | ' + document.body.innerText")
                    .await;
                self.shot(&format!("FAILED-{}", self.who)).await;
                panic!(
                    "{}: timed out waiting for {what} ({expr})\npage: {state}",
                    self.who
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn fill(&self, css: &str, text: &str) {
        let e = self.c.find(Locator::Css(css)).await.unwrap();
        e.clear().await.unwrap();
        e.send_keys(text).await.unwrap();
    }

    async fn click(&self, css: &str) {
        self.until(&format!("document.querySelector({css:?})"), css)
            .await;
        self.c
            .find(Locator::Css(css))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    async fn shot(&self, name: &str) {
        if let Ok(png) = self.c.screenshot().await {
            let _ = std::fs::write(screenshot_dir().join(format!("{name}.png")), png);
        }
    }

    async fn connected(&self) {
        self.until(
            "document.getElementById('conn-state').dataset.state === 'connected'",
            "connected",
        )
        .await;
    }

    /// Signs up (or logs in) through the form and waits for the session.
    async fn sign_in(&self, base: &str, name: &str, signup: bool) {
        self.open(base).await;
        self.until(
            "!document.getElementById('auth').hidden",
            "the sign-in form",
        )
        .await;
        self.fill("#username", name).await;
        self.fill("#password", &format!("password-{name}")).await;
        self.click(if signup { "#signup-btn" } else { "#login-btn" })
            .await;
        self.connected().await;
        self.until(
            "document.body.dataset.synced && Number(document.body.dataset.synced) > 0",
            "the first sync",
        )
        .await;
    }

    async fn tab(&self, which: &str) {
        self.click(&format!("#tab-{which}")).await;
    }

    async fn add_friend(&self, name: &str) {
        self.tab("friends").await;
        self.fill("#add-friend-user", name).await;
        self.click("#add-friend button").await;
    }

    async fn chat_with(&self, name: &str) {
        self.tab("chats").await;
        self.fill("#new-chat-user", name).await;
        self.click("#new-chat button").await;
        self.until(
            &format!("document.getElementById('conv-title').textContent === {name:?}"),
            "the conversation",
        )
        .await;
    }

    /// Types a message and presses Enter.
    async fn send(&self, body: &str) {
        let e = self.c.find(Locator::Css("#body")).await.unwrap();
        e.send_keys(body).await.unwrap();
        e.send_keys("\u{E007}").await.unwrap(); // Enter
    }

    /// Opens the conversation whose list entry shows `title`.
    async fn open_conversation(&self, title: &str) {
        self.tab("chats").await;
        let sel = conv_item(title);
        self.until(&sel, &format!("conversation {title} in the list"))
            .await;
        self.js(&format!("({sel}).click(); return true;")).await;
        self.until(
            &format!("document.getElementById('conv-title').textContent === {title:?}"),
            "the open conversation",
        )
        .await;
    }

    /// Bodies of the open conversation, in display order.
    async fn bodies(&self) -> Vec<String> {
        let v = self
            .js("return [...document.querySelectorAll('#messages .msg .body')].map(e => e.textContent);")
            .await;
        serde_json::from_value(v).unwrap()
    }

    async fn wait_body(&self, body: &str) {
        self.until(
            &format!("[...document.querySelectorAll('#messages .msg .body')].some(e => e.textContent === {body:?})"),
            &format!("message {body:?}"),
        )
        .await;
    }

    /// The unread count shown for the conversation titled `title`.
    async fn unread(&self, title: &str) -> String {
        let v = self
            .js(&format!(
                "const e = {}; return e ? e.dataset.unread : null;",
                conv_item(title)
            ))
            .await;
        v.as_str().unwrap_or("missing").to_string()
    }
}

/// JavaScript for the conversation-list entry titled `title`.
fn conv_item(title: &str) -> String {
    format!(
        "[...document.querySelectorAll('#conv-list .conv-item')].find(e => e.querySelector('.conv-title').textContent === {title:?})"
    )
}

/// JavaScript for the friend entry of `name` with presence `status`.
fn friend_with_status(name: &str, status: &str) -> String {
    format!(
        "[...document.querySelectorAll('#friend-list .friend')].find(e => e.querySelector('.name').textContent === {name:?} && e.dataset.status === {status:?})"
    )
}

/// `a` asks `b`, `b` accepts in the page; both see each other online.
async fn befriend(a: &Page, a_name: &str, b: &Page, b_name: &str) {
    a.add_friend(b_name).await;
    a.until(
        "document.querySelector('#request-list .outgoing')",
        "the outgoing request",
    )
    .await;
    b.tab("friends").await;
    b.click("#request-list .incoming .accept").await;
    b.until(&friend_with_status(a_name, "online"), "the friend online")
        .await;
    a.until(&friend_with_status(b_name, "online"), "the friend online")
        .await;
}

/// Must-show 1: two people sign up in two browsers, become friends, see each other online,
/// chat, and see the conversation in the list with the right unread counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_1_two_friends_chat() {
    if !have_chromium() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let node = TestNode::start(&[]);
    let driver = Driver::start().await;
    let alice = driver.browser("alice").await;
    let bob = driver.browser("bob").await;

    alice.open(&node.http).await;
    alice
        .until(
            "!document.getElementById('auth').hidden",
            "the sign-in form",
        )
        .await;
    alice.shot("01-sign-in").await;
    alice.sign_in(&node.http, "alice", true).await;
    bob.sign_in(&node.http, "bob", true).await;

    befriend(&alice, "alice", &bob, "bob").await;
    alice.shot("02-friends").await;

    alice.click("#friend-list .friend .chat").await;
    alice
        .until(
            "document.getElementById('conv-title').textContent === 'bob'",
            "chat with bob",
        )
        .await;
    alice.send("hello bob").await;
    alice
        .until(
            "document.querySelector('#messages .msg.mine[data-state=\"sent\"]')",
            "the send acknowledged",
        )
        .await;

    // Bob sees it in his list, unread, then opens it and replies twice.
    bob.tab("chats").await;
    bob.until(
        &format!("({}) && ({0}).dataset.unread === '1'", conv_item("alice")),
        "one unread from alice",
    )
    .await;
    bob.shot("03-conversation-list-unread").await;
    bob.open_conversation("alice").await;
    bob.wait_body("hello bob").await;
    assert_eq!(bob.unread("alice").await, "0");

    // Alice leaves the conversation (Escape) and gets two replies: two unread.
    alice
        .js("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape'})); return 1;")
        .await;
    bob.send("hi alice").await;
    bob.wait_body("hi alice").await;
    bob.send("how are you?").await;
    bob.until(
        "document.querySelectorAll('#messages .msg.mine[data-state=\"sent\"]').length === 2",
        "both replies acknowledged",
    )
    .await;
    alice
        .until(
            &format!("({}) && ({0}).dataset.unread === '2'", conv_item("bob")),
            "two unread from bob",
        )
        .await;
    assert_eq!(bob.unread("alice").await, "0");
    alice.shot("04-alice-list").await;
    alice.open_conversation("bob").await;
    alice.wait_body("how are you?").await;
    assert_eq!(
        alice.bodies().await,
        ["hello bob", "hi alice", "how are you?"]
    );
    assert_eq!(alice.unread("bob").await, "0");
    alice.shot("05-chat").await;
    bob.shot("05-chat-bob").await;

    // Log out: the sign-in form again, the device's token refused, the local copy gone.
    alice.click("#logout").await;
    alice
        .until(
            "!document.getElementById('auth').hidden",
            "the sign-in form",
        )
        .await;
    alice
        .until(
            "sessionStorage.getItem('chat.session') === null",
            "the token forgotten",
        )
        .await;
    let dbs = alice
        .c
        .execute_async(
            "const done = arguments[0]; indexedDB.databases().then(d => done(d.map(x => x.name)));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(dbs, json!([]), "the local copy was deleted");
}

/// Must-show 5: hostile bodies are shown as text and run nothing; the page is served with a
/// CSP that allows no inline script, exact content types and ETag revalidation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_5_hostile_bodies_are_text() {
    if !have_chromium() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let node = TestNode::start(&[]);

    // The page's headers.
    let http = reqwest::Client::new();
    let r = http.get(format!("{}/", node.http)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    let r = http
        .get(format!("{}/assets/app.js", node.http))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    assert_eq!(r.headers()["cache-control"], "no-cache");
    let tag = r.headers()["etag"].clone();
    let r = http
        .get(format!("{}/assets/app.js", node.http))
        .header("if-none-match", tag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    let r = http
        .get(format!("{}/assets/nope.js", node.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let driver = Driver::start().await;
    let alice = driver.browser("alice").await;
    let mallory = node.user("mallory").await;
    let (_, mut mconn) = node.device(&mallory).await;
    alice.sign_in(&node.http, "alice", true).await;
    alice.chat_with("mallory").await;

    let img = "<img src=x onerror=alert(1)>";
    let script = "<script>alert(1)</script>";
    alice.send(img).await;
    alice.wait_body(img).await;
    let alice_id = user_id(&node, &mallory.login.token, "alice").await;
    chat_tests::send_until_acked(
        &mut mconn,
        "m-1",
        chat_tests::to(alice_id.parse().unwrap()),
        script,
    )
    .await;
    alice.wait_body(script).await;
    // Give a handler (there must be none) a moment to fire.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(alice.c.get_alert_text().await.is_err(), "a dialog opened");
    let counts = alice
        .js("return [document.querySelectorAll('#messages img, #messages script, #conv-list img, #conv-list script').length, window.__pwned === undefined];")
        .await;
    assert_eq!(counts, json!([0, true]));
    assert_eq!(alice.bodies().await, [img, script]);

    // A body over 100,000 bytes is refused in the page, in words, and not sent.
    alice
        .js("document.getElementById('body').value = 'é'.repeat(50001); return 1;")
        .await;
    alice.click("#send").await;
    alice
        .until(
            "document.getElementById('composer-error').textContent.includes('the limit is 100,000 bytes')",
            "the size refusal",
        )
        .await;
    assert_eq!(alice.bodies().await, [img, script]);
    alice.shot("06-hostile-bodies-as-text").await;
}

/// The id of the user called `name`, asked with `token`.
async fn user_id(node: &TestNode, token: &str, name: &str) -> String {
    let v: Value = reqwest::Client::new()
        .get(format!("{}/v1/users/{name}", node.http))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["user_id"].as_str().unwrap().to_string()
}

/// Must-show 5, second half: a WebSocket upgrade from a foreign origin is refused with 403;
/// one from the node's own origin (the page's) and one without `Origin` (native clients) are
/// not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_5_foreign_origin_websocket_is_refused() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let node = TestNode::start(&[]);
    let upgrade = |origin: Option<&str>| {
        let mut req = node.ws_url().into_client_request().unwrap();
        if let Some(o) = origin {
            req.headers_mut().insert("origin", o.parse().unwrap());
        }
        req
    };
    let own = node.http.clone();
    assert!(tokio_tungstenite::connect_async(upgrade(None))
        .await
        .is_ok());
    assert!(tokio_tungstenite::connect_async(upgrade(Some(&own)))
        .await
        .is_ok());
    match tokio_tungstenite::connect_async(upgrade(Some("http://evil.example"))).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), 403),
        other => panic!(
            "a foreign Origin was not refused: {:?}",
            other.map(|(_, r)| r.status())
        ),
    }
}

/// Must-show 2: bob closes his tab and alice sees him offline (the node runs a 3 s heartbeat
/// timeout); bob opens a new tab and logs in: the list and history come from IndexedDB at
/// once, and `sync` from the stored cursor adds what was sent meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_2_closed_tab_goes_offline_and_comes_back() {
    if !have_chromium() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let node = TestNode::start(&[
        "--heartbeat-interval-ms",
        "1000",
        "--heartbeat-timeout-ms",
        "3000",
    ]);
    let driver = Driver::start().await;
    let alice = driver.browser("alice").await;
    let bob = driver.browser("bob").await;
    alice.sign_in(&node.http, "alice", true).await;
    bob.sign_in(&node.http, "bob", true).await;
    befriend(&alice, "alice", &bob, "bob").await;
    alice.chat_with("bob").await;
    // Quiet for longer than the heartbeat timeout: the pages' heartbeats keep them connected.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for p in [&alice, &bob] {
        assert_eq!(
            p.js("return document.body.dataset.connects;").await,
            json!("1"),
            "{}",
            p.who
        );
    }
    alice.send("one").await;
    bob.open_conversation("alice").await;
    bob.wait_body("one").await;
    bob.send("two").await;
    alice.wait_body("two").await;

    // Bob closes his tab (a new empty tab keeps his browser open).
    let old = bob.c.window().await.unwrap();
    let fresh = bob.c.new_window(true).await.unwrap();
    bob.c.switch_to_window(old).await.unwrap();
    bob.c.close_window().await.unwrap();
    bob.c.switch_to_window(fresh.handle).await.unwrap();
    alice.tab("friends").await;
    alice
        .until(&friend_with_status("bob", "offline"), "bob offline")
        .await;
    alice
        .until(
            "[...document.querySelectorAll('#friend-list .friend .last-seen')].some(e => e.textContent.startsWith('last seen'))",
            "bob's last seen",
        )
        .await;
    alice.shot("07-friend-offline").await;
    alice.tab("chats").await;
    alice.send("three, while you were away").await;
    alice
        .until(
            "document.querySelectorAll('#messages .msg.mine[data-state=\"sent\"]').length === 2",
            "acked",
        )
        .await;

    // Bob opens the page again in the new tab (a new device: sessionStorage is per tab).
    bob.open(&node.http).await;
    bob.until(
        "!document.getElementById('auth').hidden",
        "the sign-in form",
    )
    .await;
    bob.fill("#username", "bob").await;
    bob.fill("#password", "password-bob").await;
    bob.click("#login-btn").await;
    // The list is on screen from IndexedDB, with what bob had read.
    bob.until(&conv_item("alice"), "the stored conversation")
        .await;
    bob.until(
        "document.body.dataset.synced && Number(document.body.dataset.synced) > 0",
        "the sync",
    )
    .await;
    let after = bob.js("return document.body.dataset.syncAfter;").await;
    assert!(
        after.as_str().is_some_and(|s| !s.is_empty()),
        "the reopened tab synced from the stored cursor, not from the start: {after}"
    );
    assert_eq!(bob.unread("alice").await, "1");
    bob.open_conversation("alice").await;
    bob.wait_body("three, while you were away").await;
    assert_eq!(
        bob.bodies().await,
        ["one", "two", "three, while you were away"]
    );
    alice.tab("friends").await;
    alice
        .until(&friend_with_status("bob", "online"), "bob online again")
        .await;
    bob.shot("08-reopened-tab").await;
}

/// Must-show 3: alice makes a group, adds bob and carol; messages reach all; carol leaves and
/// gets nothing more; the owner removes bob, who gets nothing more either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_3_group_of_three() {
    if !have_chromium() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let node = TestNode::start(&[]);
    let driver = Driver::start().await;
    let alice = driver.browser("alice").await;
    let bob = driver.browser("bob").await;
    let carol = driver.browser("carol").await;
    alice.sign_in(&node.http, "alice", true).await;
    bob.sign_in(&node.http, "bob", true).await;
    carol.sign_in(&node.http, "carol", true).await;

    alice.fill("#new-group-name", "trio").await;
    alice.click("#new-group button").await;
    alice
        .until(
            "document.getElementById('conv-title').textContent === 'trio'",
            "the group",
        )
        .await;
    for who in ["bob", "carol"] {
        alice.fill("#add-member-user", who).await;
        alice.click("#add-member button").await;
    }
    alice
        .until(
            "document.querySelectorAll('#member-list .member').length === 3",
            "three members",
        )
        .await;
    alice.send("hello trio").await;
    for p in [&bob, &carol] {
        p.open_conversation("trio").await;
        p.wait_body("hello trio").await;
        p.until(
            "document.querySelectorAll('#member-list .member').length === 3",
            "three members",
        )
        .await;
    }
    bob.send("hi from bob").await;
    alice.wait_body("hi from bob").await;
    carol.wait_body("hi from bob").await;
    carol
        .until(
            "document.querySelector('#member-list .member[data-status=\"online\"]')",
            "presence",
        )
        .await;
    alice.shot("09-group").await;

    // Carol leaves.
    carol.click("#leave-group").await;
    carol
        .until(
            &format!("!({})", conv_item("trio")),
            "the group gone from carol's list",
        )
        .await;
    alice
        .until(
            "document.querySelectorAll('#member-list .member').length === 2",
            "two members",
        )
        .await;
    alice.open_conversation("trio").await;
    alice.send("after carol left").await;
    bob.wait_body("after carol left").await;

    // The owner removes bob.
    alice.click("#member-list .remove-member").await;
    alice
        .until(
            "document.querySelectorAll('#member-list .member').length === 1",
            "one member",
        )
        .await;
    alice.send("only me now").await;
    alice.wait_body("only me now").await;
    // Alice's own message went through the server; give a stray delivery time to arrive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!carol.bodies().await.iter().any(|b| b == "after carol left"));
    let carol_has = carol
        .js(&format!("return !!({});", conv_item("trio")))
        .await;
    assert_eq!(carol_has, json!(false), "carol got a message after leaving");
    assert!(!bob.bodies().await.iter().any(|b| b == "only me now"));
}

/// Must-show 4: in a 3-node cluster, the node alice's page is connected to is killed (-9)
/// while she has a message pending: the page shows reconnecting, moves to another node found
/// through `/v1/discover`, resends with the same client id, and bob gets the message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_4_failover_to_another_node() {
    if !have_chromium() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    // The page comes from node 0 and moves to another member, which accepts node 0's
    // origin because node 0 is a member (no --allowed-origins needed).
    let mut cluster = TestCluster::start(3, &[]).await;
    let base = cluster.nodes[0].http.clone();
    let bob = cluster.nodes[1].user("bob").await;
    let driver = Driver::start().await;
    let alice = driver.browser("alice").await;
    alice.sign_in(&base, "alice", true).await;
    alice.chat_with("bob").await;
    alice.send("before").await;
    alice
        .until(
            "document.querySelector('#messages .msg.mine[data-state=\"sent\"]')",
            "acked",
        )
        .await;
    let first_url = alice
        .js("return document.getElementById('conn-state').title;")
        .await;
    assert!(first_url
        .as_str()
        .unwrap()
        .contains(base.trim_start_matches("http://")));

    // Kill the page's node, and send at once: the message is pending across the failover.
    let e = alice.c.find(Locator::Css("#body")).await.unwrap();
    e.send_keys("during the failover").await.unwrap();
    cluster.nodes[0].kill();
    e.send_keys("\u{E007}").await.unwrap();
    alice
        .until(
            "document.getElementById('conn-state').dataset.state === 'reconnecting'",
            "reconnecting",
        )
        .await;
    alice
        .until(
            "document.querySelector('#messages .msg[data-state=\"pending\"]')",
            "a pending message",
        )
        .await;
    alice.shot("10-reconnecting").await;
    alice.connected().await;
    let now_url = alice
        .js("return document.getElementById('conn-state').title;")
        .await;
    assert_ne!(now_url, first_url, "the page moved to another node");
    alice
        .until(
            "[...document.querySelectorAll('#messages .msg.mine')].filter(e => e.dataset.state === 'sent').length === 2",
            "the pending message acknowledged",
        )
        .await;
    assert_eq!(alice.bodies().await, ["before", "during the failover"]);

    // Bob's history holds it exactly once.
    let conv = {
        let a = user_id(&cluster.nodes[1], &bob.login.token, "alice").await;
        let b = bob.id.to_string();
        let (lo, hi) = if a.parse::<u64>().unwrap() <= b.parse::<u64>().unwrap() {
            (a, b)
        } else {
            (b, a)
        };
        format!("d:{lo}:{hi}")
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let page: Value = reqwest::Client::new()
            .get(format!(
                "{}/v1/conversations/{conv}/messages?limit=200",
                cluster.nodes[1].http
            ))
            .bearer_auth(&bob.login.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let n = page["messages"].as_array().map_or(0, |m| {
            m.iter()
                .filter(|m| m["body"] == "during the failover")
                .count()
        });
        assert!(n <= 1, "delivered {n} times: {page}");
        if n == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never delivered: {page}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    alice.shot("11-after-failover").await;
}

/// The page follows a `draining` hint: node 0 (the page's node) is stopped with SIGTERM; the
/// page moves at once to the node the hint names, so node 0's drain ends with the page moved
/// (not closed at the drain timeout), and the page keeps chatting from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_6_a_draining_node_moves_the_page() {
    if !have_chromium() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    // A drain timeout far longer than a move takes: a page that ignored the hint would be
    // closed at the timeout, and the report would say so.
    // Three nodes: with node 0 stopped, the other two still make write quorums.
    let mut cluster = TestCluster::start(3, &["--drain-timeout-secs", "60"]).await;
    let base = cluster.nodes[0].http.clone();
    let _bob = cluster.nodes[1].user("bob").await;
    let driver = Driver::start().await;
    let alice = driver.browser("alice").await;
    alice.sign_in(&base, "alice", true).await;
    alice.chat_with("bob").await;
    alice.send("before").await;
    alice
        .until(
            "document.querySelector('#messages .msg.mine[data-state=\"sent\"]')",
            "acked",
        )
        .await;

    cluster.nodes[0].sigterm();
    let exit = cluster.nodes[0]
        .exit_within(Duration::from_secs(60 + 60))
        .await;
    assert_eq!(exit, Some(Some(0)), "node 0 did not stop cleanly");
    let log = cluster.nodes[0].log_text();
    let report = log
        .lines()
        .find(|l| l.contains("drained report"))
        .unwrap_or_default()
        .to_string();
    assert!(
        report.contains("moved: 1, closed: 0"),
        "the page did not move by the hint: {report}"
    );
    alice.connected().await;
    let now_url = alice
        .js("return document.getElementById('conn-state').title;")
        .await;
    let on = |i: usize| {
        now_url
            .as_str()
            .unwrap_or_default()
            .contains(cluster.nodes[i].http.trim_start_matches("http://"))
    };
    assert!(on(1) || on(2), "the page is on {now_url}, not node 1 or 2");
    alice.send("after").await;
    alice
        .until(
            "[...document.querySelectorAll('#messages .msg.mine')].filter(e => e.dataset.state === 'sent').length === 2",
            "the message sent after the move acknowledged",
        )
        .await;
}
