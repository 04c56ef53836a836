//! Group chat (issue 3): real `chatnode` processes, real HTTP and WebSocket.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chat_tests::next_message;
use chat_tests::TestNode;
use client_proto::{ConversationId, ErrorCode, GroupId, MessageId, Recipient};

fn group(g: GroupId) -> Recipient {
    Recipient::Group(g)
}

#[tokio::test]
async fn a_hundred_members_each_get_a_message_once() {
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
        devices.push(node.connect(&u.login).await);
    }
    let (_, mut owner_other) = node.device(owner).await;

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
        "send to last of 100 deliveries: {last_delivery:?} (includes reading 100 sockets in turn)"
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

#[tokio::test]
async fn membership_rules() {
    let node = TestNode::start(&[]);
    let api = node.api();
    let users = node.users("u", 102).await;
    let owner = &users[0];
    let ids: Vec<_> = users.iter().map(|u| u.id).collect();

    // Creating with 101 members is refused; with 100 it works, and the 101st is refused.
    let e = api
        .create_group(&owner.login.token, "too big", &ids[1..101])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::GroupFull));
    let g = api
        .create_group(&owner.login.token, "full", &ids[1..100])
        .await
        .unwrap();
    let e = api
        .add_member(&users[5].login.token, g.group_id, ids[100])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::GroupFull));

    // A small group for the rest.
    let (a, b, c, outsider) = (&users[0], &users[1], &users[2], &users[101]);
    let g = api
        .create_group(&a.login.token, "small", &[b.id])
        .await
        .unwrap()
        .group_id;
    let mut wa = node.connect(&a.login).await;
    let mut wb = node.connect(&b.login).await;
    let mut wc = node.connect(&c.login).await;
    let mut wo = node.connect(&outsider.login).await;

    // A non-member's send is forbidden and stored nowhere.
    let e = wo
        .send_message("x", group(g), "let me in")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden));
    assert!(wo.sync_all(None, None).await.unwrap().messages.is_empty());
    let e = api
        .history(&outsider.login.token, ConversationId::Group(g), None, None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden));
    let e = api.group(&outsider.login.token, g).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden));
    let e = api
        .remove_member(&b.login.token, g, a.id)
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(ErrorCode::Forbidden),
        "only the owner removes others"
    );

    // Any member adds; the newcomer gets what is sent after joining, not before.
    let before = wa.send_message("m1", group(g), "before c").await.unwrap();
    api.add_member(&b.login.token, g, c.id).await.unwrap();
    let after = wa.send_message("m2", group(g), "after c").await.unwrap();
    assert_eq!(next_message(&mut wc).await.message_id, after.message_id);
    let c_history = api
        .history(&c.login.token, ConversationId::Group(g), None, None)
        .await
        .unwrap();
    let c_ids: Vec<_> = c_history.messages.iter().map(|m| m.message_id).collect();
    assert_eq!(c_ids, vec![after.message_id], "history starts at the join");
    let c_sync: Vec<_> = wc
        .sync_all(None, None)
        .await
        .unwrap()
        .ids()
        .into_iter()
        .collect();
    assert_eq!(c_sync, vec![after.message_id]);
    let b_history = api
        .history(&b.login.token, ConversationId::Group(g), None, None)
        .await
        .unwrap();
    assert_eq!(b_history.messages.len(), 2);
    assert_eq!(b_history.messages[1].message_id, before.message_id);

    // The owner removes c: c gets nothing more and cannot read the history.
    api.remove_member(&a.login.token, g, c.id).await.unwrap();
    let m3 = wa.send_message("m3", group(g), "c is gone").await.unwrap();
    assert_eq!(next_message(&mut wb).await.message_id, before.message_id);
    assert_eq!(next_message(&mut wb).await.message_id, after.message_id);
    assert_eq!(next_message(&mut wb).await.message_id, m3.message_id);
    // A direct message is c's sentinel: nothing from the group may come before it.
    wa.send_message("dm", Recipient::User(c.id), "sentinel")
        .await
        .unwrap();
    assert_eq!(next_message(&mut wc).await.body, "sentinel");
    let c_sync: Vec<_> = wc
        .sync_all(None, None)
        .await
        .unwrap()
        .ids()
        .into_iter()
        .collect();
    assert!(!c_sync.contains(&m3.message_id));
    let e = api
        .history(&c.login.token, ConversationId::Group(g), None, None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden));
    let e = wc.send_message("c1", group(g), "hello?").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden));

    // The owner leaves: ownership passes to the longest-standing member.
    api.remove_member(&a.login.token, g, a.id).await.unwrap();
    let info = api.group(&b.login.token, g).await.unwrap();
    assert_eq!(info.owner, b.id);
    assert_eq!(info.members, vec![b.id]);
    assert_eq!(info.presence.as_ref().unwrap()[0].user_id, b.id);
    assert!(api
        .groups(&a.login.token)
        .await
        .unwrap()
        .iter()
        .all(|x| x.group_id != g));
    assert_eq!(
        api.groups(&b.login.token).await.unwrap().len(),
        2,
        "\"full\" and \"small\""
    );

    // The last member leaves: the group is gone.
    api.remove_member(&b.login.token, g, b.id).await.unwrap();
    let e = api.group(&b.login.token, g).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));
    let left: Vec<_> = api
        .groups(&b.login.token)
        .await
        .unwrap()
        .iter()
        .map(|x| x.name.clone())
        .collect();
    assert_eq!(left, vec!["full".to_string()]);
}

#[tokio::test]
async fn an_offline_member_syncs_and_history_pages_cover_everything() {
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
        senders.push(node.connect(&u.login).await);
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
    let (_, mut late) = node.device(&users[3]).await;
    // Sync in small batches, and again from a mid-way cursor: after dedup by id, every
    // message exactly once, in order.
    let first = late.sync_all(None, Some(13)).await.unwrap();
    let again = late
        .sync_all(Some(client_proto::Position(sent[40].0)), None)
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
