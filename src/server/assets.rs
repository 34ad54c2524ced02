//! The web UI, embedded in the binary from `web/`.

use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

/// (path, content type, body)
const FILES: [(&str, &str, &str); 6] = [
    (
        "/index.html",
        "text/html; charset=utf-8",
        include_str!("../../web/index.html"),
    ),
    (
        "/app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/app.js"),
    ),
    (
        "/capture-worklet.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/capture-worklet.js"),
    ),
    (
        "/playback-worklet.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/playback-worklet.js"),
    ),
    (
        "/style.css",
        "text/css; charset=utf-8",
        include_str!("../../web/style.css"),
    ),
    (
        "/favicon.svg",
        "image/svg+xml",
        include_str!("../../web/favicon.svg"),
    ),
];

pub(super) async fn serve(uri: Uri) -> Response {
    let path = match uri.path() {
        "/" => "/index.html",
        other => other,
    };
    match FILES.iter().find(|(p, _, _)| *p == path) {
        Some((_, kind, body)) => (
            [
                (header::CONTENT_TYPE, *kind),
                (header::CACHE_CONTROL, "no-cache"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}
