//! Group chat (issue 3): the membership rules, over HTTP with members on WebSocket. Delivery
//! to a hundred members and an offline member's sync run over every transport in
//! `scenarios/groups.rs`.

#![allow(clippy::unwrap_used)]

use chat_tests::next_message;
use chat_tests::TestNode;
use client_proto::{ConversationId, ErrorCode, GroupId, Recipient};

fn group(g: GroupId) -> Recipient {
    Recipient::Group(g)
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
