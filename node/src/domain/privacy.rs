//! Privacy settings: who may send a user direct messages and who may add them to groups
//! (`everyone`, `friends`: mutual friends only, or `nobody`; a user is never refused by
//! their own settings). The settings live in the user record; the checks are here so that
//! chat and groups ask one place.

use client_proto::http::{self, PrivacySettings};
use client_proto::ids::UserId;

use crate::domain::error::ApiError;
use crate::store::records::{Audience, Privacy};
use crate::store::Store;

/// What the setting is about, for the refusal's sentence.
#[derive(Clone, Copy, Debug)]
pub enum Action {
    Message,
    GroupAdd,
}

impl Action {
    fn what(self) -> &'static str {
        match self {
            Action::Message => "direct messages",
            Action::GroupAdd => "group adds",
        }
    }
}

pub fn audience_to_wire(a: Audience) -> http::Audience {
    match a {
        Audience::Everyone => http::Audience::Everyone,
        Audience::Friends => http::Audience::Friends,
        Audience::Nobody => http::Audience::Nobody,
    }
}

pub fn audience_from_wire(a: http::Audience) -> Audience {
    match a {
        http::Audience::Everyone => Audience::Everyone,
        http::Audience::Friends => Audience::Friends,
        http::Audience::Nobody => Audience::Nobody,
    }
}

pub fn to_wire(p: Privacy) -> PrivacySettings {
    PrivacySettings {
        messages: audience_to_wire(p.messages),
        group_adds: audience_to_wire(p.group_adds),
    }
}

/// `Ok` if `owner`'s `audience` for `action` lets `actor` do it, else `forbidden` with a
/// sentence naming the setting.
pub async fn check(
    store: &Store,
    audience: Audience,
    action: Action,
    owner: UserId,
    actor: UserId,
) -> Result<(), ApiError> {
    let allowed = actor == owner
        || match audience {
            Audience::Everyone => true,
            Audience::Nobody => false,
            Audience::Friends => store.are_friends(owner, actor).await?,
        };
    if allowed {
        return Ok(());
    }
    metrics::counter!("privacy_refusals_total").increment(1);
    let from = match audience {
        Audience::Friends => "only from their friends",
        _ => "from nobody",
    };
    Err(ApiError::forbidden(format!(
        "user {owner} accepts {} {from}",
        action.what()
    )))
}
