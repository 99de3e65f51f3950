//! The usual test world for bridge tests: fake identity service, fake LibreChat, a real Redis
//! (AOF on), and helpers to run BFF instances against them with seeded users.

use std::time::Duration;

use librechat_bff::credentials::{
    vault::{CredentialStatus, Password},
    KeyRing,
};
use reqwest::{header, StatusCode};
use serde_json::{json, Value};

use crate::{
    bff::{config, TestBff},
    fake_idp::{FakeIdp, FakeIdpOptions, FakeUser},
    fake_librechat::{FakeLibreChat, FakeLibreChatOptions},
    redis::RedisServer,
};

pub const ID_PASSWORD: &str = "correct horse battery staple";
pub const BROWSER_UA: &str =
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36";

pub struct World {
    pub idp: FakeIdp,
    pub lc: FakeLibreChat,
    pub redis: RedisServer,
    pub key: String,
}

impl World {
    pub async fn new(lc_opts: FakeLibreChatOptions) -> World {
        Self::with_redis(lc_opts, RedisServer::start_with_aof().await).await
    }

    /// The world on a Redis of the test's choosing (TLS, a cluster: [`RedisServer::external`]).
    pub async fn with_redis(lc_opts: FakeLibreChatOptions, redis: RedisServer) -> World {
        let idp = FakeIdp::start(FakeIdpOptions::default()).await;
        let lc = FakeLibreChat::start(lc_opts).await;
        World {
            idp,
            lc,
            redis,
            key: KeyRing::generate_key(),
        }
    }

    pub async fn bff(&self, extra: &[(&str, String)]) -> TestBff {
        let mut env = vec![
            ("BFF__IDENTITY__BASE_URL", self.idp.base_url.clone()),
            (
                "BFF__IDENTITY__JWT__HS_SECRET",
                self.idp.hs_secret().expect("HS256"),
            ),
            ("BFF__SESSION__STORE", "redis".into()),
            ("BFF__REDIS__URL", self.redis.url()),
            ("BFF__REDIS__KEY_PREFIX", self.redis.key_prefix()),
            ("BFF__CRYPTO__FERNET_KEYS", self.key.clone()),
            ("BFF__LIBRECHAT__URL", self.lc.base_url.clone()),
            ("BFF__LIBRECHAT__CONNECT_TIMEOUT_SECS", "2".into()),
        ];
        env.extend(extra.iter().cloned());
        TestBff::start(config(&env)).await
    }

    /// A user known to the identity service, with a ready LibreChat account and vault record.
    pub async fn user(&self, bff: &TestBff, id: i64) -> String {
        let email = format!("user{id}@example.com");
        self.idp.add_user(FakeUser {
            id,
            username: format!("user{id}"),
            email: email.clone(),
            password: ID_PASSWORD.into(),
            name: format!("User {id}"),
            groups: vec![],
            is_active: true,
        });
        let lc_password = format!("lc-pass-{id}-Xy9!long");
        self.lc
            .create_user(&email, &lc_password, &format!("User {id}"));
        let vault = &bff.state.vault;
        let record = vault.new_record(
            &id.to_string(),
            &email,
            None,
            &Password::new(lc_password),
            CredentialStatus::Ready,
        );
        vault.put(&record).await.expect("seed vault");
        email
    }

    pub fn bearer(&self, id: i64) -> String {
        self.idp.mint_access(id, Duration::from_secs(600))
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

pub async fn get_json(bff: &TestBff, path: &str, bearer: &str) -> (StatusCode, Value) {
    let res = http()
        .get(format!("{}{path}", bff.base_url))
        .bearer_auth(bearer)
        .send()
        .await
        .expect("send");
    assert!(
        res.headers().get(header::SET_COOKIE).is_none(),
        "LibreChat's Set-Cookie must never reach the client"
    );
    let status = res.status();
    (status, res.json().await.unwrap_or(Value::Null))
}

pub fn chat_body(text: &str) -> Value {
    json!({
        "text": text,
        "parentMessageId": "00000000-0000-0000-0000-000000000000",
        "conversationId": "new",
        "endpoint": "FakeAI",
        "endpointType": "custom",
        "model": "fake-model",
    })
}
