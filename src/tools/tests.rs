//! Every tool rule and call path, each with its test: over 600 lines because the rules are many.

use std::error::Error;
use std::net::SocketAddr;

use axum::Json;
use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;

use super::*;
use crate::config::HttpToolConfig;

type TestResult = Result<(), Box<dyn Error>>;

const KNOWLEDGE: &str = "# Mesa de ayuda

## ¿Cuál es el horario de la biblioteca?
> ¿A qué hora abre la biblioteca?

De lunes a viernes de 8 a 21 horas y los sábados de 9 a 14 horas.

## ¿Cómo hago la matrícula?
> ¿Cómo me matriculo?

La matrícula se hace en el portal del estudiante, del 1 al 15 de marzo.
";

fn knowledge() -> Result<Arc<KnowledgeBase>, Box<dyn Error>> {
    let files = [("ayuda.md".to_owned(), KNOWLEDGE.to_owned())];
    Ok(Arc::new(KnowledgeBase::from_markdown(&files)?))
}

fn http_tool(name: &str, url: &str) -> HttpToolConfig {
    HttpToolConfig {
        name: name.to_owned(),
        description: format!("Test tool {name}."),
        schema: r#"{"type":"object","properties":{"id":{"type":"string"}}}"#.to_owned(),
        url: url.to_owned(),
    }
}

fn error_text(value: &Value) -> &str {
    assert_eq!(value["status"], "error", "not an error object: {value}");
    value["error"].as_str().unwrap_or_default()
}

fn names(tools: &Tools) -> Vec<String> {
    tools.specs().into_iter().map(|spec| spec.name).collect()
}

#[test]
fn registry_is_shareable() {
    fn shareable<T: Send + Sync + Clone + 'static>() {}
    shareable::<Tools>();
}

#[test]
fn defaults_and_toml() -> TestResult {
    let defaults = ToolsConfig::default();
    assert!(defaults.knowledge);
    assert_eq!(defaults.time_zone, "America/Lima");
    assert_eq!(defaults.timeout_ms, 5_000);
    assert!(defaults.http.is_empty());
    assert_eq!(defaults.validate(), Ok(()));
    assert_eq!(toml::from_str::<ToolsConfig>("")?, defaults);

    let text = r#"
        knowledge = false
        time_zone = "Europe/Madrid"
        timeout_ms = 2000

        [[http]]
        name = "ticket_status"
        description = "Status of a support ticket."
        schema = '{"type":"object","properties":{"id":{"type":"string"}},"required":["id"]}'
        url = "https://desk.example.edu/api/ticket"
    "#;
    let parsed: ToolsConfig = toml::from_str(text)?;
    assert!(!parsed.knowledge);
    assert_eq!(parsed.time_zone, "Europe/Madrid");
    assert_eq!(parsed.timeout_ms, 2_000);
    assert_eq!(parsed.http.len(), 1);
    assert_eq!(parsed.http[0].name, "ticket_status");
    assert_eq!(parsed.validate(), Ok(()));
    // Serialising and reading back gives the same configuration.
    assert_eq!(
        toml::from_str::<ToolsConfig>(&toml::to_string(&parsed)?)?,
        parsed
    );

    assert!(toml::from_str::<ToolsConfig>("colour = 1").is_err());
    let missing_url = "[[http]]\nname = \"a\"\ndescription = \"b\"\nschema = \"{}\"";
    assert!(toml::from_str::<ToolsConfig>(missing_url).is_err());
    Ok(())
}

#[test]
fn validation_names_the_bad_entry() {
    let good = |name: &str| http_tool(name, "http://127.0.0.1:9/x");
    let with_http = |http: Vec<HttpToolConfig>| ToolsConfig {
        http,
        ..ToolsConfig::default()
    };
    let cases: Vec<(ToolsConfig, &str)> = vec![
        (
            with_http(vec![good("a"), http_tool("b", "ftp://x")]),
            r#"tools.http[1].url = "ftp://x": not an http(s) URL"#,
        ),
        (
            with_http(vec![http_tool("a", "not a url")]),
            r#"tools.http[0].url = "not a url": not an http(s) URL"#,
        ),
        (
            with_http(vec![http_tool("a", "mailto:help@example.edu")]),
            "tools.http[0].url = \"mailto:help@example.edu\": not an http(s) URL",
        ),
        (
            with_http(vec![good("a"), good("b"), good("a")]),
            r#"tools.http[2].name = "a": already used by tools.http[0]"#,
        ),
        (
            with_http(vec![good("current_datetime")]),
            r#"tools.http[0].name = "current_datetime": is the name of a built-in tool"#,
        ),
        (
            with_http(vec![good("search_knowledge")]),
            r#"tools.http[0].name = "search_knowledge": is the name of a built-in tool"#,
        ),
        (
            with_http(vec![good("")]),
            r#"tools.http[0].name = "": must be 1 to 64"#,
        ),
        (
            with_http(vec![good("has space")]),
            r#"tools.http[0].name = "has space": must be 1 to 64"#,
        ),
        (
            with_http(vec![good("ñandú")]),
            r#"tools.http[0].name = "ñandú": must be 1 to 64"#,
        ),
        (
            with_http(vec![good(&"n".repeat(65))]),
            "tools.http[0].name = \"nnnnn",
        ),
        (
            with_http(vec![HttpToolConfig {
                description: "  ".to_owned(),
                ..good("a")
            }]),
            r#"tools.http[0].description = "  ": must say"#,
        ),
        (
            with_http(vec![HttpToolConfig {
                schema: "[1, 2]".to_owned(),
                ..good("a")
            }]),
            r#"tools.http[0].schema = "[1, 2]": not a JSON object"#,
        ),
        (
            with_http(vec![HttpToolConfig {
                schema: "{type: object}".to_owned(),
                ..good("a")
            }]),
            r#"tools.http[0].schema = "{type: object}": not JSON"#,
        ),
        (
            ToolsConfig {
                time_zone: "Mars/Olympus_Mons".to_owned(),
                ..ToolsConfig::default()
            },
            r#"tools.time_zone = "Mars/Olympus_Mons": not a known IANA time zone"#,
        ),
        (
            ToolsConfig {
                timeout_ms: 99,
                ..ToolsConfig::default()
            },
            "tools.timeout_ms = 99: must be between 100 and 120000 ms",
        ),
        (
            ToolsConfig {
                timeout_ms: 120_001,
                ..ToolsConfig::default()
            },
            "tools.timeout_ms = 120001: must be between 100 and 120000 ms",
        ),
    ];
    for (config, expected) in cases {
        match config.validate() {
            Ok(()) => panic!("accepted, expected {expected:?}: {config:?}"),
            Err(error) => {
                let message = error.to_string();
                assert!(
                    message.starts_with(expected),
                    "{message:?} does not start with {expected:?}"
                );
            }
        }
    }
    // The longest name and the range ends are fine.
    let edges = ToolsConfig {
        timeout_ms: 100,
        http: vec![good(&"A-z_9".repeat(12)), good(&"n".repeat(64))],
        ..ToolsConfig::default()
    };
    assert_eq!(edges.validate(), Ok(()));
    let slow = ToolsConfig {
        timeout_ms: 120_000,
        ..ToolsConfig::default()
    };
    assert_eq!(slow.validate(), Ok(()));
}

#[test]
fn long_values_are_shortened_in_errors() {
    let config = ToolsConfig {
        http: vec![HttpToolConfig {
            schema: format!("[{}]", "1,".repeat(500)),
            ..http_tool("a", "http://127.0.0.1:9/x")
        }],
        ..ToolsConfig::default()
    };
    let message = config
        .validate()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(message.contains('…'), "{message}");
    assert!(message.len() < 300, "{message}");
}

#[test]
fn new_refuses_an_invalid_config() {
    let config = ToolsConfig {
        time_zone: "Nowhere/Special".to_owned(),
        ..ToolsConfig::default()
    };
    match Tools::new(&config, None) {
        Err(ToolError::Config(error)) => assert_eq!(error.key, "tools.time_zone"),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[tokio::test]
async fn specs_follow_the_config() -> TestResult {
    let kb = knowledge()?;
    let all = ToolsConfig {
        http: vec![http_tool("ticket_status", "https://desk.example.edu/t")],
        ..ToolsConfig::default()
    };
    let tools = Tools::new(&all, Some(Arc::clone(&kb)))?;
    assert_eq!(
        names(&tools),
        ["search_knowledge", "current_datetime", "ticket_status"]
    );
    let specs = tools.specs();
    assert_eq!(
        specs[0].schema,
        json!({
            "type": "object",
            "properties": {"query": {"type": "string", "description": specs[0].schema["properties"]["query"]["description"]}},
            "required": ["query"]
        })
    );
    assert!(specs[0].description.contains("knowledge base"));
    assert_eq!(specs[1].schema, json!({"type": "object", "properties": {}}));
    assert!(specs[1].description.contains("America/Lima"));
    assert_eq!(specs[2].description, "Test tool ticket_status.");
    assert_eq!(specs[2].schema["properties"]["id"]["type"], "string");

    // No search tool without a base, or when switched off.
    let none = Tools::new(&ToolsConfig::default(), None)?;
    assert_eq!(names(&none), ["current_datetime"]);
    let off = ToolsConfig {
        knowledge: false,
        ..ToolsConfig::default()
    };
    let off = Tools::new(&off, Some(kb))?;
    assert_eq!(names(&off), ["current_datetime"]);
    let refused = off
        .call("search_knowledge", &json!({"query": "biblioteca"}))
        .await;
    assert!(error_text(&refused).contains("unknown tool"), "{refused}");
    Ok(())
}

#[tokio::test]
async fn search_knowledge_returns_the_best_entries() -> TestResult {
    let tools = Tools::new(&ToolsConfig::default(), Some(knowledge()?))?;
    let reply = tools
        .call(
            "search_knowledge",
            &json!({"query": "¿a qué hora abre la biblioteca?"}),
        )
        .await;
    let results = reply["results"].as_array().ok_or("no results array")?;
    assert!(!results.is_empty() && results.len() <= 3, "{reply}");
    assert_eq!(
        results[0]["question"],
        "¿Cuál es el horario de la biblioteca?"
    );
    let answer = results[0]["answer"].as_str().ok_or("no answer")?;
    assert!(answer.contains("de 8 a 21 horas"), "{answer}");
    assert!(results[0]["score"].as_f64().ok_or("no score")? > 0.0);
    assert!(reply.get("note").is_none());

    // Recognised speech: no accents, other wording.
    let reply = tools
        .call("search_knowledge", &json!({"query": "como me matriculo"}))
        .await;
    assert_eq!(
        reply["results"][0]["question"], "¿Cómo hago la matrícula?",
        "{reply}"
    );
    Ok(())
}

#[tokio::test]
async fn search_knowledge_says_when_nothing_matches() -> TestResult {
    let tools = Tools::new(&ToolsConfig::default(), Some(knowledge()?))?;
    let reply = tools
        .call("search_knowledge", &json!({"query": "receta de la paella"}))
        .await;
    assert_eq!(
        reply,
        json!({"results": [], "note": "nothing relevant found"})
    );
    Ok(())
}

#[tokio::test]
async fn search_knowledge_rejects_bad_arguments() -> TestResult {
    let tools = Tools::new(&ToolsConfig::default(), Some(knowledge()?))?;
    let long = "biblioteca ".repeat(100);
    let cases = [
        (json!({}), "missing the query"),
        (Value::Null, "missing the query"),
        (json!({"query": 7}), "must be a string"),
        (json!({"query": "   "}), "empty"),
        (json!({"query": long}), "longer than 1000 characters"),
        (json!(["biblioteca"]), "must be a JSON object"),
        (json!("biblioteca"), "must be a JSON object"),
    ];
    for (arguments, expected) in cases {
        let reply = tools.call("search_knowledge", &arguments).await;
        let message = error_text(&reply);
        assert!(message.contains(expected), "{arguments}: {message}");
        assert!(message.starts_with("search_knowledge"), "{message}");
    }
    Ok(())
}

#[tokio::test]
async fn unknown_tool_is_an_error_object() -> TestResult {
    let tools = Tools::new(&ToolsConfig::default(), Some(knowledge()?))?;
    let reply = tools.call("launch_rocket", &json!({})).await;
    assert_eq!(
        reply,
        json!({"status": "error", "error": "unknown tool \"launch_rocket\""})
    );
    Ok(())
}

fn at(instant: &str, zone: &str) -> Result<Value, Box<dyn Error>> {
    let now: jiff::Timestamp = instant.parse()?;
    let tz = jiff::tz::TimeZone::get(zone)?;
    Ok(clock::datetime_at(now, &tz, zone))
}

#[test]
fn datetime_in_lima_at_a_fixed_instant() -> TestResult {
    assert_eq!(
        at("2026-11-27T07:15:00Z", "America/Lima")?,
        json!({
            "iso": "2026-11-27T02:15:00-05:00",
            "date": "2026-11-27",
            "time": "02:15",
            "weekday": "Friday",
            "weekday_es": "viernes",
            "time_zone": "America/Lima",
            "utc_offset": "-05:00",
        })
    );
    // Just after midnight UTC it is still the previous day in Lima.
    let evening = at("2026-01-01T03:59:59Z", "America/Lima")?;
    assert_eq!(evening["iso"], "2025-12-31T22:59:59-05:00");
    assert_eq!(evening["weekday_es"], "miércoles");
    Ok(())
}

#[test]
fn datetime_in_other_zones() -> TestResult {
    // Summer time in Madrid, on a Sunday.
    let madrid = at("2026-07-05T10:30:00Z", "Europe/Madrid")?;
    assert_eq!(madrid["iso"], "2026-07-05T12:30:00+02:00");
    assert_eq!(madrid["utc_offset"], "+02:00");
    assert_eq!(
        (&madrid["weekday"], &madrid["weekday_es"]),
        (&json!("Sunday"), &json!("domingo"))
    );
    // Winter time in Madrid.
    let winter = at("2026-01-05T10:30:00Z", "Europe/Madrid")?;
    assert_eq!(winter["utc_offset"], "+01:00");
    assert_eq!(winter["weekday_es"], "lunes");
    // A half-hour offset.
    let kolkata = at("2026-03-07T00:00:00Z", "Asia/Kolkata")?;
    assert_eq!(kolkata["iso"], "2026-03-07T05:30:00+05:30");
    assert_eq!(kolkata["weekday_es"], "sábado");
    let utc = at("2026-03-07T00:00:00Z", "UTC")?;
    assert_eq!(utc["utc_offset"], "+00:00");
    Ok(())
}

#[tokio::test]
async fn current_datetime_call_uses_the_configured_zone() -> TestResult {
    let tools = Tools::new(&ToolsConfig::default(), None)?;
    // Arguments are ignored; none at all is fine.
    for arguments in [json!({}), Value::Null, json!({"zone": "UTC"})] {
        let reply = tools.call("current_datetime", &arguments).await;
        assert_eq!(reply["time_zone"], "America/Lima", "{reply}");
        assert_eq!(reply["utc_offset"], "-05:00", "{reply}");
        let iso = reply["iso"].as_str().ok_or("no iso")?;
        let date = reply["date"].as_str().ok_or("no date")?;
        let time = reply["time"].as_str().ok_or("no time")?;
        assert!(iso.starts_with(&format!("{date}T{time}:")), "{reply}");
        assert!(iso.ends_with("-05:00"), "{reply}");
        let parsed: jiff::Timestamp = iso.parse()?;
        assert!(parsed <= jiff::Timestamp::now());
    }
    Ok(())
}

/// A real HTTP server on 127.0.0.1 with one route per kind of reply.
async fn serve() -> Result<SocketAddr, Box<dyn Error>> {
    let app = Router::new()
        .route(
            "/echo",
            post(|headers: HeaderMap, Json(body): Json<Value>| async move {
                let content_type = headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                Json(json!({"received": body, "content_type": content_type}))
            }),
        )
        .route("/array", post(|| async { Json(json!([1, 2, 3])) }))
        .route("/text", post(|| async { Json(json!("abierto")) }))
        .route(
            "/fail",
            post(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "database  down\n") }),
        )
        .route(
            "/empty_fail",
            post(|| async { StatusCode::SERVICE_UNAVAILABLE }),
        )
        .route("/not_json", post(|| async { "<html>hello</html>" }))
        .route(
            "/big",
            post(|| async { Json(json!({"blob": "x".repeat(MAX_REPLY_BYTES)})) }),
        )
        .route(
            "/just_fits",
            post(|| async {
                // `{"blob":"…"}` is 11 bytes around the string.
                Json(json!({"blob": "x".repeat(MAX_REPLY_BYTES - 11)}))
            }),
        )
        .route(
            "/redirect",
            post(|| async { (StatusCode::FOUND, [(header::LOCATION, "/echo")]) }),
        )
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(600)).await;
                Json(json!({"late": true}))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        // Ends with the test's runtime.
        let _ = axum::serve(listener, app).await;
    });
    Ok(address)
}

/// Tools with one HTTP tool per route of [`serve`], named after the route.
fn http_tools(address: SocketAddr, timeout_ms: u32) -> Result<Tools, ToolError> {
    let routes = [
        "echo",
        "array",
        "text",
        "fail",
        "empty_fail",
        "not_json",
        "big",
        "just_fits",
        "redirect",
        "slow",
    ];
    let config = ToolsConfig {
        timeout_ms,
        http: routes
            .iter()
            .map(|route| http_tool(route, &format!("http://{address}/{route}")))
            .collect(),
        ..ToolsConfig::default()
    };
    Tools::new(&config, None)
}

#[tokio::test]
async fn http_tool_posts_the_arguments_as_json() -> TestResult {
    let tools = http_tools(serve().await?, 30_000)?;
    let arguments = json!({"id": "T-42", "urgent": true, "nota": "matrícula"});
    let reply = tools.call("echo", &arguments).await;
    assert_eq!(
        reply,
        json!({"received": arguments, "content_type": "application/json"})
    );
    // No arguments are sent as an empty object.
    let reply = tools.call("echo", &Value::Null).await;
    assert_eq!(reply["received"], json!({}));
    Ok(())
}

#[tokio::test]
async fn http_tool_wraps_a_reply_that_is_not_an_object() -> TestResult {
    let tools = http_tools(serve().await?, 30_000)?;
    assert_eq!(
        tools.call("array", &json!({})).await,
        json!({"result": [1, 2, 3]})
    );
    assert_eq!(
        tools.call("text", &json!({})).await,
        json!({"result": "abierto"})
    );
    Ok(())
}

#[tokio::test]
async fn http_tool_failures_are_error_objects() -> TestResult {
    let tools = http_tools(serve().await?, 30_000)?;
    let cases = [
        (
            "fail",
            "fail: the service answered 500 Internal Server Error: database down",
        ),
        (
            "empty_fail",
            "empty_fail: the service answered 503 Service Unavailable",
        ),
        ("not_json", "not_json: the reply is not JSON"),
        ("big", "big: the reply is larger than 65536 bytes"),
        ("redirect", "redirect: the service answered 302 Found"),
    ];
    for (name, expected) in cases {
        let reply = tools.call(name, &json!({})).await;
        let message = error_text(&reply);
        assert!(message.starts_with(expected), "{name}: {message}");
        assert!(!message.contains("127.0.0.1"), "the URL leaked: {message}");
    }
    // A reply of exactly the limit is accepted.
    let fits = tools.call("just_fits", &json!({})).await;
    assert_eq!(
        fits["blob"].as_str().map(str::len),
        Some(MAX_REPLY_BYTES - 11),
        "{}",
        fits.get("error").unwrap_or(&Value::Null)
    );
    // Arguments that are not an object never reach the service.
    let reply = tools.call("echo", &json!([1])).await;
    assert_eq!(
        error_text(&reply),
        "echo: the arguments must be a JSON object"
    );
    Ok(())
}

#[tokio::test]
async fn http_tool_unreachable_service_is_an_error_object() -> TestResult {
    // A port that was just free: nothing listens there any more.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await?
        .local_addr()?;
    let tools = http_tools(closed, 30_000)?;
    let reply = tools.call("echo", &json!({})).await;
    let message = error_text(&reply);
    assert!(message.starts_with("echo: "), "{message}");
    assert!(!message.contains("127.0.0.1"), "the URL leaked: {message}");
    Ok(())
}

#[tokio::test]
async fn http_tool_slower_than_the_timeout_is_an_error_object() -> TestResult {
    // The route sleeps for 600 s; the tool gives up after 200 ms.
    let tools = http_tools(serve().await?, 200)?;
    let reply = tools.call("slow", &json!({})).await;
    let message = error_text(&reply);
    assert_eq!(message, "slow: no answer within 200 ms");
    Ok(())
}
