//! Groups over a connection: a message to a hundred members reaches each once, and a member
//! who was offline syncs everything. (Membership rules, over HTTP, are tested once, in
//! `groups.rs`.)

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chat_tests::{next_message, TestNode, Transport};
use client_proto::{ConversationId, GroupId, MessageId, Recipient};

use crate::cursor;

fn group(g: GroupId) -> Recipient {
    Recipient::Group(g)
}

async fn a_hundred_members_each_get_a_message_once(t: Transport) {
    let node = TestNode::start(&[]);
    let users = node.users("m", 100).await;
    let owner = &users[0];
    let ids: Vec<_> = users.iter().map(|u| u.id).collect();
    let info = node
        .api()
        .create_group(&owner.login.token, "hundred", &ids[1..])
        .await
        .unwrap();
    assert_eq!(info.members.len(), 100);
    assert_eq!(info.owner, owner.id);

    let mut devices = Vec::new();
    for u in &users {
        devices.push(t.connect(&node, &u.login).await);
    }
    let (_, mut owner_other) = t.device(&node, owner).await;

    let started = Instant::now();
    let ack = devices[0]
        .send_message("g1", group(info.group_id), "hello hundred")
        .await
        .unwrap();
    assert_eq!(ack.conversation, ConversationId::Group(info.group_id));
    let mut last_delivery = Duration::ZERO;
    for d in devices[1..]
        .iter_mut()
        .chain(std::iter::once(&mut owner_other))
    {
        let m = next_message(d).await;
        last_delivery = last_delivery.max(started.elapsed());
        assert_eq!(m.message_id, ack.message_id);
        assert_eq!(m.group, Some(info.group_id));
        assert_eq!(m.from, owner.id);
    }
    println!(
        "{t}: send to last of 100 deliveries: {last_delivery:?} (includes reading 100 connections in turn)"
    );

    // A second message is the next thing every device sees: nobody got the first one twice,
    // and the sending device never got its own.
    let ack2 = devices[1]
        .send_message("g2", group(info.group_id), "second")
        .await
        .unwrap();
    for (i, d) in devices
        .iter_mut()
        .enumerate()
        .chain(std::iter::once((100, &mut owner_other)))
    {
        if i == 1 {
            continue;
        }
        let m = next_message(d).await;
        assert_eq!(m.message_id, ack2.message_id, "device {i} saw {m:?}");
    }
    // The sender saw exactly one ack for its message (a duplicate ack would be pending).
    let extra = devices[0].recv(Duration::from_millis(300)).await;
    assert!(extra.is_err(), "unexpected frame at the sender: {extra:?}");
}
over_each_transport!(a_hundred_members_each_get_a_message_once =>
    a_hundred_members_each_get_a_message_once_over_ws_json,
    a_hundred_members_each_get_a_message_once_over_ws_binary,
    a_hundred_members_each_get_a_message_once_over_quic,
);

/// The history pages here are HTTP, the same on every transport; they check what was sent
/// over `t`.
async fn an_offline_member_syncs_and_history_pages_cover_everything(t: Transport) {
    let node = TestNode::start(&["--rate-limit-burst", "1000"]);
    let users = node.users("s", 4).await;
    let g = node
        .api()
        .create_group(
            &users[0].login.token,
            "sync",
            &[users[1].id, users[2].id, users[3].id],
        )
        .await
        .unwrap()
        .group_id;
    let mut senders = Vec::new();
    for u in &users[..3] {
        senders.push(t.connect(&node, &u.login).await);
    }
    // users[3] is offline while 90 messages arrive from three members.
    let mut sent = Vec::new();
    for i in 0..90 {
        let ack = senders[i % 3]
            .send_message(&format!("c{i}"), group(g), &format!("n{i}"))
            .await
            .unwrap();
        sent.push(ack.message_id);
    }
    let (_, mut late) = t.device(&node, &users[3]).await;
    // Sync in small batches, and again from a mid-way cursor: after dedup by id, every
    // message exactly once, in order.
    let first = late.sync_all(None, Some(13)).await.unwrap();
    let again = late
        .sync_all(Some(cursor::after(sent[40])), None)
        .await
        .unwrap();
    let mut seen = HashSet::new();
    let mut order: Vec<MessageId> = Vec::new();
    for m in first.messages.iter().chain(again.messages.iter()) {
        if seen.insert(m.message_id) {
            order.push(m.message_id);
        }
    }
    assert_eq!(order, sent);

    // History pages of 9 cover every message once, newest first.
    let mut got = Vec::new();
    let mut before = None;
    loop {
        let page = node
            .api()
            .history(
                &users[3].login.token,
                ConversationId::Group(g),
                before,
                Some(9),
            )
            .await
            .unwrap();
        got.extend(page.messages.iter().map(|m| m.message_id));
        match page.next_before {
            Some(b) => before = Some(b),
            None => break,
        }
    }
    let mut want = sent.clone();
    want.reverse();
    assert_eq!(got, want);
}
over_each_transport!(an_offline_member_syncs_and_history_pages_cover_everything =>
    an_offline_member_syncs_and_history_pages_cover_everything_over_ws_json,
    an_offline_member_syncs_and_history_pages_cover_everything_over_ws_binary,
    an_offline_member_syncs_and_history_pages_cover_everything_over_quic,
);
