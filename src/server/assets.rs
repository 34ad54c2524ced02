//! The web UI, embedded in the binary from `web/`: the page, its ES modules
//! (the page itself, text, capture, player, protocol), the two audio
//! worklets, the style sheet and the icon.

use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

/// Browsers run a module script or a worklet only with a JavaScript type.
const JAVASCRIPT: &str = "text/javascript; charset=utf-8";

/// (path, content type, body)
const FILES: [(&str, &str, &str); 10] = [
    (
        "/index.html",
        "text/html; charset=utf-8",
        include_str!("../../web/index.html"),
    ),
    ("/app.js", JAVASCRIPT, include_str!("../../web/app.js")),
    ("/text.js", JAVASCRIPT, include_str!("../../web/text.js")),
    (
        "/capture.js",
        JAVASCRIPT,
        include_str!("../../web/capture.js"),
    ),
    (
        "/player.js",
        JAVASCRIPT,
        include_str!("../../web/player.js"),
    ),
    (
        "/protocol.js",
        JAVASCRIPT,
        include_str!("../../web/protocol.js"),
    ),
    (
        "/capture-worklet.js",
        JAVASCRIPT,
        include_str!("../../web/capture-worklet.js"),
    ),
    (
        "/playback-worklet.js",
        JAVASCRIPT,
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

#[cfg(test)]
mod tests {
    use super::{FILES, JAVASCRIPT};

    /// Every quoted absolute path to a file in `body`: what the page links
    /// (`src`, `href`) and what a module loads (`import … from`, `addModule`).
    fn local_paths(body: &str) -> Vec<&str> {
        let mut paths = Vec::new();
        for (at, _) in body.match_indices('/') {
            let Some(quote) = body[..at].chars().next_back() else {
                continue;
            };
            if quote != '\'' && quote != '"' {
                continue;
            }
            let Some(len) = body[at..].find(quote) else {
                continue;
            };
            let path = &body[at..at + len];
            if [".js", ".css", ".svg", ".html"]
                .iter()
                .any(|ext| path.ends_with(ext))
            {
                paths.push(path);
            }
        }
        paths
    }

    #[test]
    fn every_file_the_page_loads_is_served_with_its_type() {
        let mut loaded = vec!["/index.html"];
        for (path, _, body) in FILES {
            if path.ends_with(".html") || path.ends_with(".js") {
                loaded.extend(local_paths(body));
            }
        }
        for path in &loaded {
            let served = FILES.iter().find(|(p, _, _)| p == path);
            let Some((_, kind, _)) = served else {
                panic!("{path} is loaded but not served");
            };
            if path.ends_with(".js") {
                assert_eq!(*kind, JAVASCRIPT, "{path}");
            }
        }
        for (path, _, _) in FILES {
            assert!(
                loaded.contains(&path),
                "{path} is served but nothing loads it"
            );
        }
        for module in ["/text.js", "/capture.js", "/player.js", "/protocol.js"] {
            let app = FILES.iter().find(|(p, _, _)| *p == "/app.js").map(|f| f.2);
            assert!(
                app.is_some_and(|body| local_paths(body).contains(&module)),
                "app.js does not import {module}"
            );
        }
    }
}
