//! Hostile answers from the API side: a body of hundreds of megabytes is cut off at the cap,
//! deeply nested JSON is refused without recursion, a redirect is never followed (the key would
//! go to another host).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use bytes::Bytes;
use futures_util::StreamExt;
use prism_sync::batch::BatchItem;
use prism_sync::classify::{BatchVerdict, CodePolicy, Exchange, TransportFailure, classify};
use prism_sync::client::MicroClient;
use prism_sync::model::ObjectType;
use prism_sync::settings::HttpSettings;

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn client(base: &str) -> MicroClient {
    let http = HttpSettings {
        max_response_bytes: 1024 * 1024,
        ..HttpSettings::default()
    };
    MicroClient::new(base, "team", Some("the-key".to_owned().into()), &http).unwrap()
}

fn items() -> Vec<BatchItem> {
    vec![BatchItem {
        record_id: uuid::Uuid::new_v4(),
        rows: vec![1],
        attempts: 0,
    }]
}

fn policy() -> CodePolicy {
    CodePolicy {
        retryable: Default::default(),
        permanent: Default::default(),
        max_attempts: 3,
    }
}

const PATH: &str = "/v2/prism/team/contact/batch/update";

#[tokio::test]
async fn a_body_of_hundreds_of_megabytes_is_cut_off_at_the_cap() {
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let app = Router::new().route(
        PATH,
        post(move || {
            let counter = counter.clone();
            async move {
                // 300 MiB in 64 KiB chunks, no content-length: only a cap on reading stops it.
                let chunk = Bytes::from(vec![b'['; 64 * 1024]);
                let stream = futures_util::stream::iter((0..4800).map(move |_| {
                    counter.fetch_add(1, Ordering::Relaxed);
                    Ok::<_, std::io::Error>(chunk.clone())
                }));
                Body::from_stream(stream)
            }
        }),
    );
    let base = serve(app).await;
    let exchange = client(&base)
        .send(ObjectType::Contact, "k", Bytes::from_static(b"{}"))
        .await;
    // A 200: the API applied the batch, but the answer cannot be read.
    assert!(
        matches!(
            exchange,
            Exchange::Unreadable {
                status: 200,
                kind: TransportFailure::ResponseTooLarge,
                ..
            }
        ),
        "{exchange:?}"
    );
    assert!(
        sent.load(Ordering::Relaxed) < 4800,
        "the client stopped reading long before the end"
    );
    assert!(matches!(
        classify(&exchange, &items(), &policy()),
        BatchVerdict::Unreadable { status: 200, .. }
    ));
}

#[tokio::test]
async fn an_announced_huge_body_is_refused_before_reading() {
    // `content-length: 300 MiB`, then 10 bytes and a body that never ends: only a client that
    // refuses on the header returns; one that reads would wait for ever (the timeout below).
    // (A fixed 10-byte body under that header made hyper's server drop the connection, and
    // the test passed on the resulting `Interrupted` without any size check being made.)
    let app = Router::new().route(
        PATH,
        post(|| async {
            let mut h = HeaderMap::new();
            h.insert("content-length", "314572800".parse().unwrap());
            let start = futures_util::stream::once(async {
                Ok::<_, std::io::Error>(Bytes::from_static(b"          "))
            });
            let body = Body::from_stream(start.chain(futures_util::stream::pending()));
            (StatusCode::OK, h, body)
        }),
    );
    let base = serve(app).await;
    let exchange = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        client(&base).send(ObjectType::Contact, "k", Bytes::from_static(b"{}")),
    )
    .await
    .expect("the client waited for a body it should have refused on its announced size");
    // A 200: the API applied the batch, but the answer cannot be read.
    match &exchange {
        Exchange::Unreadable {
            status: 200,
            kind: TransportFailure::ResponseTooLarge,
            detail,
        } => assert!(detail.contains("announces 314572800 bytes"), "{detail}"),
        other => panic!("expected a size refusal, got {other:?}"),
    }
    assert!(matches!(
        classify(&exchange, &items(), &policy()),
        BatchVerdict::Unreadable { status: 200, .. }
    ));
}

#[tokio::test]
async fn deeply_nested_json_is_refused_not_recursed() {
    let app = Router::new().route(
        PATH,
        post(|| async {
            let depth = 200_000;
            let body = format!(
                "{{\"results\": {}{}}}",
                "[".repeat(depth),
                "]".repeat(depth)
            );
            (StatusCode::OK, [("content-type", "application/json")], body)
        }),
    );
    let base = serve(app).await;
    let exchange = client(&base)
        .send(ObjectType::Contact, "k", Bytes::from_static(b"{}"))
        .await;
    assert!(matches!(exchange, Exchange::Answered(_)));
    // Unreadable, not a plain retry: the 200 means the API applied the batch, so its key is
    // never released to new keys.
    assert!(matches!(
        classify(&exchange, &items(), &policy()),
        BatchVerdict::Unreadable { status: 200, .. }
    ));
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_the_key_never_reaches_the_other_host() {
    let other_hits = Arc::new(AtomicUsize::new(0));
    let hits = other_hits.clone();
    let other = serve(Router::new().fallback(move || {
        let hits = hits.clone();
        async move {
            hits.fetch_add(1, Ordering::Relaxed);
            "stolen"
        }
    }))
    .await;
    let target = format!("{other}/steal");
    let app = Router::new().route(
        PATH,
        post(move || {
            let target = target.clone();
            async move { (StatusCode::TEMPORARY_REDIRECT, [("location", target)]).into_response() }
        }),
    );
    let base = serve(app).await;
    let exchange = client(&base)
        .send(ObjectType::Contact, "k", Bytes::from_static(b"{}"))
        .await;
    let Exchange::Answered(answer) = &exchange else {
        panic!("{exchange:?}")
    };
    assert_eq!(answer.status, 307);
    assert_eq!(
        other_hits.load(Ordering::Relaxed),
        0,
        "nothing was sent to the redirect target"
    );
    assert!(
        matches!(classify(&exchange, &items(), &policy()), BatchVerdict::Retry { code, .. } if code == "http_307")
    );
}
