//! Devices and privacy (issue 13): device management (list, revoke, idle expiry, the cap
//! evicting the oldest-idle device), friend requests, presence for friends and group
//! co-members only, and who may message a user or add them to groups. Real `chatnode`
//! processes, real HTTP and WebSocket.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use chat_tests::{TestNode, TestUser};
use client_proto::client::{ClientError, WsConnection};
use client_proto::http::{Audience, FriendState, PrivacyPatch};
use client_proto::{ClientFrame, ErrorCode, PresenceStatus, Recipient, ServerFrame, UserId};

const WAIT: Duration = Duration::from_secs(20);

fn refused_with(r: Result<impl std::fmt::Debug, ClientError>, code: ErrorCode) -> String {
    match r {
        Err(ClientError::Refused(b)) if b.code == code => b.message,
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

/// Waits for a presence frame about `user`, or fails at the first frame `stop` accepts.
async fn presence_of(ws: &mut WsConnection, user: UserId) -> (PresenceStatus, Option<u64>) {
    ws.wait_for(WAIT, |f| match f {
        ServerFrame::Presence {
            user_id,
            status,
            last_seen,
        } if *user_id == user => Some((*status, *last_seen)),
        _ => None,
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn forty_logins_in_a_row_succeed_and_the_oldest_idle_device_is_evicted() {
    let node = TestNode::start(&[]);
    let api = node.api();
    let alice = node.user("alice").await;
    // The first device stays connected: eviction closes it.
    let mut first = node.connect(&alice.login).await;
    let mut last = None;
    for i in 0..40 {
        let login = api
            .login(&alice.name, &alice.password, None)
            .await
            .unwrap_or_else(|e| panic!("login {i} refused: {e}"));
        last = Some(login);
    }
    let last = last.unwrap();
    let devices = api.devices(&last.token).await.unwrap();
    println!("devices after 41 logins: {}", devices.len());
    assert!(devices.len() <= 32, "{} devices listed", devices.len());
    assert_eq!(devices.iter().filter(|d| d.current).count(), 1);
    assert!(devices
        .iter()
        .any(|d| d.current && d.device_id == last.device_id));
    // The device used least recently (the first) made room: its token is refused and its
    // socket closed as logged out.
    assert!(!devices.iter().any(|d| d.device_id == alice.login.device_id));
    refused_with(api.me(&alice.login.token).await, ErrorCode::Unauthorized);
    let closed = first.wait_for(WAIT, |_| None::<()>).await.unwrap_err();
    assert!(
        matches!(&closed, ClientError::Closed(Some((1008, why))) if why == "logged out"),
        "{closed:?}"
    );
    // The node still serves the account.
    assert_eq!(api.me(&last.token).await.unwrap().user_id, alice.id);
}

#[tokio::test]
async fn a_revoked_device_gets_401_and_its_socket_is_closed() {
    let node = TestNode::start(&[]);
    let api = node.api();
    let alice = node.user("alice").await;
    let mut phone = node.connect(&alice.login).await;
    let (laptop, _laptop_ws) = node.device(&alice).await;

    let devices = api.devices(&laptop.token).await.unwrap();
    assert_eq!(devices.len(), 2);
    let phone_entry = devices
        .iter()
        .find(|d| d.device_id == alice.login.device_id)
        .unwrap();
    assert!(!phone_entry.current);
    assert!(phone_entry.last_seen >= phone_entry.created_at);

    api.revoke_device(&laptop.token, alice.login.device_id)
        .await
        .unwrap();
    refused_with(api.me(&alice.login.token).await, ErrorCode::Unauthorized);
    let closed = phone.wait_for(WAIT, |_| None::<()>).await.unwrap_err();
    assert!(
        matches!(&closed, ClientError::Closed(Some((1008, why))) if why == "logged out"),
        "{closed:?}"
    );
    // Revoking it again: no such device.
    refused_with(
        api.revoke_device(&laptop.token, alice.login.device_id)
            .await,
        ErrorCode::NotFound,
    );
    // Someone else's device is not yours to revoke.
    let bob = node.user("bob").await;
    refused_with(
        api.revoke_device(&bob.login.token, laptop.device_id).await,
        ErrorCode::NotFound,
    );
    let left = api.devices(&laptop.token).await.unwrap();
    assert_eq!(left.len(), 1);
    assert!(left[0].current);
}

#[tokio::test]
async fn idle_devices_expire() {
    let node = TestNode::start(&["--device-idle-secs", "2"]);
    let api = node.api();
    let alice = node.user("alice").await;
    // Used a while later than its idle lifetime: logged out.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let why = refused_with(api.me(&alice.login.token).await, ErrorCode::Unauthorized);
    assert!(why.contains("unused"), "{why}");
    let again = api.login(&alice.name, &alice.password, None).await.unwrap();
    let devices = api.devices(&again.token).await.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].device_id, again.device_id);
}

#[tokio::test]
async fn friendship_takes_a_request_and_an_accept() {
    let node = TestNode::start(&[]);
    let api = node.api();
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let carol = node.user("carol").await;

    assert_eq!(
        api.befriend(&alice.login.token, bob.id).await.unwrap(),
        FriendState::Requested
    );
    // Asking again changes nothing; one side alone is no friendship.
    assert_eq!(
        api.befriend(&alice.login.token, bob.id).await.unwrap(),
        FriendState::Requested
    );
    let friends = |u: &TestUser| {
        let api = api.clone();
        let token = u.login.token.clone();
        async move {
            api.request::<serde_json::Value>(
                reqwest::Method::GET,
                "/v1/friends",
                Some(&token),
                None::<&()>,
            )
            .await
            .unwrap()
        }
    };
    assert_eq!(friends(&alice).await, serde_json::json!([]));
    assert_eq!(friends(&bob).await, serde_json::json!([]));
    let bobs = api.friend_requests(&bob.login.token).await.unwrap();
    assert_eq!(bobs.incoming.len(), 1);
    assert_eq!(bobs.incoming[0].user_id, alice.id);
    assert!(bobs.outgoing.is_empty());
    let alices = api.friend_requests(&alice.login.token).await.unwrap();
    assert_eq!(alices.outgoing[0].username, "bob");

    // bob accepts: friends on both sides, no requests left.
    assert_eq!(
        api.befriend(&bob.login.token, alice.id).await.unwrap(),
        FriendState::Friends
    );
    assert_eq!(friends(&alice).await[0]["username"], "bob");
    assert_eq!(friends(&bob).await[0]["username"], "alice");
    assert_eq!(
        api.friend_requests(&bob.login.token).await.unwrap(),
        Default::default()
    );

    // carol asks bob; bob declines: nothing left on either side.
    api.befriend(&carol.login.token, bob.id).await.unwrap();
    api.unfriend(&bob.login.token, carol.id).await.unwrap();
    assert_eq!(
        api.friend_requests(&carol.login.token).await.unwrap(),
        Default::default()
    );
    assert_eq!(friends(&carol).await, serde_json::json!([]));
    // Yourself: 400.
    refused_with(
        api.befriend(&alice.login.token, alice.id).await,
        ErrorCode::BadRequest,
    );
}

#[tokio::test]
async fn presence_is_for_friends_and_group_co_members_only() {
    let node = TestNode::start(&[]);
    let api = node.api();
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let carol = node.user("carol").await;
    // carol is alice's friend: her transitions are the sentinel.
    api.befriend(&alice.login.token, carol.id).await.unwrap();
    api.befriend(&carol.login.token, alice.id).await.unwrap();

    let mut a = node.connect(&alice.login).await;
    // The stranger's subscription is refused and nothing is watched.
    a.send(&ClientFrame::SubscribePresence {
        users: vec![bob.id],
    })
    .await
    .unwrap();
    let (code, message) = a
        .wait_for(WAIT, |f| match f {
            ServerFrame::Error {
                code,
                message,
                reference: None,
                ..
            } => Some((*code, message.clone())),
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!(code, ErrorCode::Forbidden, "{message}");
    let b = node.connect(&bob.login).await;
    let c = node.connect(&carol.login).await;
    let (status, last_seen) = presence_of(&mut a, carol.id).await;
    assert_eq!(status, PresenceStatus::Online);
    // Online times are to the minute, not the millisecond.
    assert_eq!(last_seen.unwrap() % 60_000, 0, "{last_seen:?}");
    b.close().await;
    c.close().await;
    assert_eq!(
        presence_of(&mut a, carol.id).await.0,
        PresenceStatus::Offline
    );
    // Nothing about bob came before carol's frames.
    while let Ok(f) = a.recv(Duration::from_millis(1)).await {
        assert!(
            !matches!(&f, ServerFrame::Presence { user_id, .. } if *user_id == bob.id),
            "a stranger's presence leaked: {f:?}"
        );
    }

    // After a request and an accept, alice watches bob (automatically, as a friend).
    api.befriend(&alice.login.token, bob.id).await.unwrap();
    api.befriend(&bob.login.token, alice.id).await.unwrap();
    let b = node.connect(&bob.login).await;
    assert_eq!(presence_of(&mut a, bob.id).await.0, PresenceStatus::Online);
    b.close().await;
    assert_eq!(presence_of(&mut a, bob.id).await.0, PresenceStatus::Offline);

    // A group co-member who is not a friend may be watched explicitly.
    let dave = node.user("dave").await;
    api.create_group(&dave.login.token, "club", &[alice.id])
        .await
        .unwrap();
    a.send(&ClientFrame::SubscribePresence {
        users: vec![dave.id],
    })
    .await
    .unwrap();
    a.send_message("barrier", Recipient::User(alice.id), "barrier")
        .await
        .unwrap();
    let _d = node.connect(&dave.login).await;
    assert_eq!(presence_of(&mut a, dave.id).await.0, PresenceStatus::Online);
}

#[tokio::test]
async fn privacy_settings_refuse_strangers_and_let_friends_through() {
    let node = TestNode::start(&[]);
    let api = node.api();
    let alice = node.user("alice").await; // bob's friend
    let bob = node.user("bob").await;
    let carol = node.user("carol").await; // a stranger
    api.befriend(&alice.login.token, bob.id).await.unwrap();
    api.befriend(&bob.login.token, alice.id).await.unwrap();
    let mut a = node.connect(&alice.login).await;
    let mut c = node.connect(&carol.login).await;

    // The default is everyone, for both settings.
    let settings = api.privacy(&bob.login.token).await.unwrap();
    assert_eq!(settings.messages, Audience::Everyone);
    assert_eq!(settings.group_adds, Audience::Everyone);
    c.send_message("c0", Recipient::User(bob.id), "hi before")
        .await
        .unwrap();

    let settings = api
        .set_privacy(
            &bob.login.token,
            &PrivacyPatch {
                messages: Some(Audience::Friends),
                group_adds: Some(Audience::Nobody),
            },
        )
        .await
        .unwrap();
    assert_eq!(settings.messages, Audience::Friends);
    assert_eq!(settings.group_adds, Audience::Nobody);
    // A patch changes only what it names.
    let settings = api
        .set_privacy(&bob.login.token, &PrivacyPatch::default())
        .await
        .unwrap();
    assert_eq!(settings.messages, Audience::Friends);

    // carol (a new recipient for the node's cache) is refused; alice gets through.
    let refused = c
        .send_message("c1", Recipient::User(bob.id), "hi stranger")
        .await;
    let why = refused_with(refused, ErrorCode::Forbidden);
    assert!(why.contains("friends"), "{why}");
    a.send_message("a1", Recipient::User(bob.id), "hi friend")
        .await
        .unwrap();
    // The refused message is stored nowhere.
    let mut b = node.connect(&bob.login).await;
    let bodies: Vec<String> = b
        .sync_all(None, None)
        .await
        .unwrap()
        .messages
        .iter()
        .map(|m| m.body.clone())
        .collect();
    assert!(bodies.contains(&"hi friend".to_string()), "{bodies:?}");
    assert!(!bodies.contains(&"hi stranger".to_string()), "{bodies:?}");

    // group_adds: nobody: not even a friend adds bob, at creation or later.
    refused_with(
        api.create_group(&alice.login.token, "with bob", &[bob.id])
            .await,
        ErrorCode::Forbidden,
    );
    let g = api
        .create_group(&alice.login.token, "without bob", &[carol.id])
        .await
        .unwrap();
    refused_with(
        api.add_member(&alice.login.token, g.group_id, bob.id).await,
        ErrorCode::Forbidden,
    );
    // group_adds: friends: the friend may, the stranger may not.
    api.set_privacy(
        &bob.login.token,
        &PrivacyPatch {
            group_adds: Some(Audience::Friends),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let cg = api
        .create_group(&carol.login.token, "carol's", &[])
        .await
        .unwrap();
    refused_with(
        api.add_member(&carol.login.token, cg.group_id, bob.id)
            .await,
        ErrorCode::Forbidden,
    );
    api.add_member(&alice.login.token, g.group_id, bob.id)
        .await
        .unwrap();
    // bob, now a member, still works normally.
    b.send_message("b1", Recipient::Group(g.group_id), "hello group")
        .await
        .unwrap();
}

/// Waits for `sentinel` to be reported `want` on `ws`; whether a presence frame about
/// `user` came first.
async fn until_sentinel(
    ws: &mut WsConnection,
    sentinel: UserId,
    want: PresenceStatus,
    user: UserId,
) -> bool {
    let mut saw = false;
    loop {
        match ws.recv(WAIT).await.unwrap() {
            ServerFrame::Presence { user_id, .. } if user_id == user => saw = true,
            ServerFrame::Presence {
                user_id, status, ..
            } if user_id == sentinel && status == want => return saw,
            _ => {}
        }
    }
}

/// Connects `sentinel` (a friend of `ws`'s user) on `node` and disconnects it, waiting for
/// both transitions on `ws`; whether a presence frame about `user` came meanwhile.
async fn sentinel_round(
    ws: &mut WsConnection,
    node: &TestNode,
    sentinel: &TestUser,
    user: UserId,
) -> bool {
    let c = node.connect(&sentinel.login).await;
    let online = until_sentinel(ws, sentinel.id, PresenceStatus::Online, user).await;
    c.close().await;
    let offline = until_sentinel(ws, sentinel.id, PresenceStatus::Offline, user).await;
    online || offline
}

/// Waits until `node` reports `friend` online in `user`'s friend list (it heard by gossip).
async fn until_online_on(node: &TestNode, user: &TestUser, friend: UserId) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let list: serde_json::Value = node
            .api()
            .request(
                reqwest::Method::GET,
                "/v1/friends",
                Some(&user.login.token),
                None::<&()>,
            )
            .await
            .unwrap();
        let online = list
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["user_id"] == friend.to_string() && f["status"] == "online");
        if online {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{friend} never online"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn friendship_changes_reach_watches_on_other_nodes() {
    let cluster = chat_tests::TestCluster::start(3, &[]).await;
    let [n1, n2, n3] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    let alice = n1.user("alice").await;
    let bob = n2.user("bob").await;
    let carol = n3.user("carol").await; // alice's friend: the sentinel
    n1.api()
        .befriend(&alice.login.token, carol.id)
        .await
        .unwrap();
    n1.api()
        .befriend(&carol.login.token, alice.id)
        .await
        .unwrap();
    let mut a = n1.connect(&alice.login).await;

    // Asked and accepted on node 3, where neither is connected: alice's connection on node 1
    // starts watching bob (on node 2) without reconnecting. The change travels to node 1
    // asynchronously, so bob comes and goes until alice sees it.
    n3.api().befriend(&alice.login.token, bob.id).await.unwrap();
    n3.api().befriend(&bob.login.token, alice.id).await.unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "alice never saw bob's presence"
        );
        let b = n2.connect(&bob.login).await;
        until_online_on(n1, &alice, bob.id).await;
        b.close().await;
        if sentinel_round(&mut a, n2, &carol, bob.id).await {
            break;
        }
    }

    // Unfriended on node 3: alice's connection on node 1 stops watching bob.
    n3.api().unfriend(&bob.login.token, alice.id).await.unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "alice kept seeing bob's presence after the unfriending"
        );
        let b = n2.connect(&bob.login).await;
        let saw = sentinel_round(&mut a, n2, &carol, bob.id).await;
        b.close().await;
        if !saw {
            break;
        }
    }
}
