//! The MQTT driver with an IAM principal (as over WebSocket), on an in-memory stream: the
//! connection is authorized by the caller's policies and ends when its credentials expire.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use sekisho_broker::{Broker, BrokerConfig};
use sekisho_gateway::authn::Caller;
use sekisho_gateway::conn::ConnInfo;
use sekisho_gateway::{Endpoint, GatewayConfig, Shared, tls};
use sekisho_mqtt::{Connect, Packet, Properties, ProtocolVersion, decode, encode};
use sekisho_registry::{IamPrincipal, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn shared() -> (Arc<Shared>, String, tokio::sync::watch::Sender<bool>) {
    let registry = Arc::new(Registry::in_memory("us-east-1").unwrap());
    let (info, _) = registry.create_account("a").unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let config = GatewayConfig {
        aws: Default::default(),
        codec_limits: Default::default(),
        sni: tls::SniRouter {
            data_suffix: "iot.us-east-1.localhost".into(),
            default_names: vec!["localhost".into()],
        },
        object_store_url: None,
        handshake_timeout: Duration::from_secs(10),
    };
    let broker = Arc::new(Broker::new(BrokerConfig::default()));
    (Shared::new(registry, broker, config, rx), info.id, tx)
}

fn connect(client_id: &str) -> BytesMut {
    let mut buf = BytesMut::new();
    let c = Connect {
        version: ProtocolVersion::V5,
        clean_start: true,
        keep_alive: 60,
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    };
    encode(&Packet::Connect(Box::new(c)), ProtocolVersion::V5, &mut buf).unwrap();
    buf
}

async fn next_packet(stream: &mut tokio::io::DuplexStream, buf: &mut BytesMut) -> Option<Packet> {
    loop {
        if let Some(p) = decode(buf, ProtocolVersion::V5, &Default::default()).unwrap() {
            return Some(p);
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await.unwrap();
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn info(caller: Caller) -> ConnInfo {
    ConnInfo {
        peer: "127.0.0.1:1".parse().unwrap(),
        account: sekisho_registry::AccountId::new(caller.account.clone()),
        certificate: None,
        endpoint: Arc::new(Endpoint::public("test", 10)),
        caller: Some(Box::new(caller)),
        slot: None,
        custom: None,
        server_name: None,
    }
}

#[tokio::test]
async fn connection_ends_when_temporary_credentials_expire() {
    let (shared, account, _stop) = shared();
    let session = shared
        .registry
        .create_session(&account, IamPrincipal::Root, 2, None)
        .unwrap();
    let caller = Caller {
        account: account.clone(),
        principal: IamPrincipal::Root,
        session_policy: None,
        temporary: true,
        expiration: Some(session.expiration),
        access_key_id: session.access_key_id.clone(),
        context: Default::default(),
        principal_id: account.clone(),
        principal_arn: String::new(),
        from_get_session_token: false,
    };
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let task = tokio::spawn(sekisho_gateway::conn::serve(
        shared.clone(),
        server,
        info(caller),
    ));
    client.write_all(&connect("dash")).await.unwrap();
    let mut buf = BytesMut::new();
    match next_packet(&mut client, &mut buf).await {
        Some(Packet::ConnAck(c)) => assert_eq!(c.code, 0),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let started = std::time::Instant::now();
    // Nothing is sent; the server ends the connection at the credentials' expiry.
    match tokio::time::timeout(Duration::from_secs(10), next_packet(&mut client, &mut buf))
        .await
        .unwrap()
    {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, 0x98),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(4));
    task.await.unwrap();
}

#[tokio::test]
async fn iam_policies_decide_connect() {
    let (shared, account, _stop) = shared();
    shared.registry.create_user(&account, "u", None).unwrap();
    shared
        .registry
        .put_inline_policy(
            &account,
            false,
            "u",
            "p",
            &format!(
                r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"iot:Connect","Resource":"arn:aws:iot:us-east-1:{account}:client/ok-*"}}]}}"#
            ),
        )
        .unwrap();
    let key = shared
        .registry
        .create_access_key(&account, Some("u"))
        .unwrap();
    for (client_id, code) in [("ok-1", 0u8), ("nope", 0x87)] {
        let caller = Caller {
            account: account.clone(),
            principal: IamPrincipal::User("u".into()),
            session_policy: None,
            temporary: false,
            expiration: None,
            access_key_id: key.access_key_id.clone(),
            context: Default::default(),
            principal_id: shared.registry.get_user(&account, "u").unwrap().id,
            principal_arn: String::new(),
            from_get_session_token: false,
        };
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(sekisho_gateway::conn::serve(
            shared.clone(),
            server,
            info(caller),
        ));
        client.write_all(&connect(client_id)).await.unwrap();
        let mut buf = BytesMut::new();
        match next_packet(&mut client, &mut buf).await {
            Some(Packet::ConnAck(c)) => assert_eq!(c.code, code, "{client_id}"),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        drop(client);
        task.await.unwrap();
    }
}

/// `iot:CertificateId` names a certificate: an IAM connection has none, so a condition on it
/// cannot be met with the caller's access key id (it once resolved to it).
#[tokio::test]
async fn an_iam_connection_has_no_certificate_id() {
    let (shared, account, _stop) = shared();
    shared.registry.create_user(&account, "u", None).unwrap();
    let key = shared
        .registry
        .create_access_key(&account, Some("u"))
        .unwrap();
    let user_id = shared.registry.get_user(&account, "u").unwrap().id;
    for (condition, code) in [
        // Control: the same grant without the condition connects.
        ("", 0u8),
        (
            r#","Condition":{"StringLike":{"iot:CertificateId":"*"}}"#,
            0x87,
        ),
        (
            &*format!(
                r#","Condition":{{"StringEquals":{{"iot:CertificateId":"{}"}}}}"#,
                key.access_key_id
            ),
            0x87,
        ),
    ] {
        shared
            .registry
            .put_inline_policy(
                &account,
                false,
                "u",
                "p",
                &format!(
                    r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"iot:Connect","Resource":"*"{condition}}}]}}"#
                ),
            )
            .unwrap();
        let caller = Caller {
            account: account.clone(),
            principal: IamPrincipal::User("u".into()),
            session_policy: None,
            temporary: false,
            expiration: None,
            access_key_id: key.access_key_id.clone(),
            context: Default::default(),
            principal_id: user_id.clone(),
            principal_arn: String::new(),
            from_get_session_token: false,
        };
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(sekisho_gateway::conn::serve(
            shared.clone(),
            server,
            info(caller),
        ));
        client.write_all(&connect("c1")).await.unwrap();
        let mut buf = BytesMut::new();
        match next_packet(&mut client, &mut buf).await {
            Some(Packet::ConnAck(c)) => assert_eq!(c.code, code, "{condition}"),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        drop(client);
        task.await.unwrap();
    }
}
