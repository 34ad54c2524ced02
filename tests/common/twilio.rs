//! A Twilio-like client: the signed webhook, the signed Media Streams
//! socket, and caller audio as μ-law `media` messages.

use std::time::Duration;

/// Twilio's signature of `url` and `params` (its documented algorithm,
/// written again here so the test checks the gateway's, not itself).
pub fn twilio_signature(token: &str, url: &str, params: &[(&str, &str)]) -> String {
    use hmac::Mac as _;
    let mut sorted = params.to_vec();
    sorted.sort();
    let mut data = url.to_owned();
    for (name, value) in sorted {
        data.push_str(name);
        data.push_str(value);
    }
    let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(token.as_bytes()).unwrap();
    mac.update(data.as_bytes());
    super::base64(&mac.finalize().into_bytes())
}

pub const PUBLIC_URL: &str = "https://voz.example.edu";
pub const AUTH_TOKEN: &str = "twilio-auth-token-for-tests";

/// Posts a call to the webhook; the status and the body.
pub async fn call_webhook(
    addr: std::net::SocketAddr,
    call_sid: &str,
    signature: &str,
) -> (u16, String) {
    let params = [
        ("CallSid", call_sid),
        ("From", "+51987654321"),
        ("To", "+5115550000"),
    ];
    let body: String = params
        .iter()
        .map(|(n, v)| format!("{n}={}", v.replace('+', "%2B")))
        .collect::<Vec<_>>()
        .join("&");
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/twilio/voice"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .header("X-Twilio-Signature", signature)
        .body(body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

pub type TwilioSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The stream's socket, signed as Twilio signs it (or not).
pub async fn twilio_stream(addr: std::net::SocketAddr, signed: bool) -> Result<TwilioSocket, u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let mut request = format!("ws://{addr}/twilio/stream")
        .into_client_request()
        .unwrap();
    let signature = if signed {
        twilio_signature(AUTH_TOKEN, "wss://voz.example.edu/twilio/stream", &[])
    } else {
        "bm90IGEgc2lnbmF0dXJl".to_owned()
    };
    request
        .headers_mut()
        .insert("X-Twilio-Signature", signature.parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("{e}"),
    }
}

pub async fn send_event(socket: &mut TwilioSocket, value: serde_json::Value) {
    use futures_util::SinkExt as _;
    socket
        .send(tokio_tungstenite::tungstenite::Message::Text(
            value.to_string().into(),
        ))
        .await
        .unwrap();
}

/// The next message from the gateway: its JSON, or `None` once closed
/// (with the close code).
pub async fn next_event(socket: &mut TwilioSocket) -> Result<serde_json::Value, Option<u16>> {
    use futures_util::StreamExt as _;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), socket.next())
            .await
            .expect("a message in time");
        match message {
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text).unwrap()),
            Some(Ok(Message::Close(frame))) => return Err(frame.map(|f| u16::from(f.code))),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Err(None),
        }
    }
}

/// `connected` and `start`, as Twilio sends them.
pub async fn start_stream(socket: &mut TwilioSocket, call_sid: &str, token: &str) {
    send_event(
        socket,
        serde_json::json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
    )
    .await;
    send_event(
        socket,
        serde_json::json!({"event": "start", "sequenceNumber": "1",
        "start": {"accountSid": "AC0", "streamSid": "MZ0001", "callSid": call_sid,
            "tracks": ["inbound"], "customParameters": {"token": token},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}},
        "streamSid": "MZ0001"}),
    )
    .await;
}

/// 20 ms of caller audio as a `media` message.
pub fn media(samples: &[i16], chunk: usize) -> serde_json::Value {
    let mut ulaw = Vec::new();
    sonora::audio::g711::encode_into(samples, &mut ulaw);
    serde_json::json!({"event": "media", "sequenceNumber": (chunk + 2).to_string(), "streamSid": "MZ0001",
        "media": {"track": "inbound", "chunk": (chunk + 1).to_string(), "timestamp": (chunk * 20).to_string(),
            "payload": super::base64(&ulaw)}})
}

/// Loudness of a `media` message's audio (mean absolute sample).
pub fn loudness(event: &serde_json::Value) -> f64 {
    let payload = event["media"]["payload"].as_str().unwrap();
    let ulaw = super::unbase64(payload).unwrap();
    assert_eq!(ulaw.len(), 160, "20 ms frames");
    ulaw.iter()
        .map(|&b| f64::from(sonora::audio::g711::decode(b)).abs())
        .sum::<f64>()
        / 160.0
}

/// A fresh call's token from the webhook.
pub async fn call_token(addr: std::net::SocketAddr, call_sid: &str) -> String {
    let params = [
        ("CallSid", call_sid),
        ("From", "+51987654321"),
        ("To", "+5115550000"),
    ];
    let signature = twilio_signature(AUTH_TOKEN, "https://voz.example.edu/twilio/voice", &params);
    let (status, twiml) = call_webhook(addr, call_sid, &signature).await;
    assert_eq!(status, 200, "{twiml}");
    twiml
        .split("name=\"token\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned()
}
