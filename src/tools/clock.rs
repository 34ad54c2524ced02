//! The `current_datetime` tool: a speech model has no clock, and "is the
//! library open now?" needs the local date, time and weekday.

use jiff::civil::Weekday;
use jiff::tz::TimeZone;
use serde_json::{Value, json};

use super::{CURRENT_DATETIME, ToolSpec};

pub(super) fn spec(time_zone: &str) -> ToolSpec {
    ToolSpec {
        name: CURRENT_DATETIME.to_owned(),
        description: format!(
            "Returns the current date, time (24-hour) and weekday at the help desk, in the \
             {time_zone} time zone. Use it for questions about today's date, the time, or \
             whether something is open now."
        ),
        schema: json!({"type": "object", "properties": {}}),
    }
}

/// The date and time at `now` in `zone`, reported as `zone_name`.
pub(super) fn datetime_at(now: jiff::Timestamp, zone: &TimeZone, zone_name: &str) -> Value {
    let local = now.to_zoned_datetime(zone.clone());
    let date = format!(
        "{:04}-{:02}-{:02}",
        local.year(),
        local.month(),
        local.day()
    );
    let clock = format!("{:02}:{:02}", local.hour(), local.minute());
    let offset = utc_offset(local.offset().seconds());
    let (weekday, weekday_es) = weekday_names(local.weekday());
    json!({
        "iso": format!("{date}T{clock}:{:02}{offset}", local.second()),
        "date": date,
        "time": clock,
        "weekday": weekday,
        "weekday_es": weekday_es,
        "time_zone": zone_name,
        "utc_offset": offset,
    })
}

/// `±HH:MM` (seconds, which only old local mean times have, are dropped).
fn utc_offset(seconds: i32) -> String {
    let sign = if seconds < 0 { '-' } else { '+' };
    let minutes = seconds.unsigned_abs() / 60;
    format!("{sign}{:02}:{:02}", minutes / 60, minutes % 60)
}

/// English and Spanish names.
fn weekday_names(day: Weekday) -> (&'static str, &'static str) {
    match day {
        Weekday::Monday => ("Monday", "lunes"),
        Weekday::Tuesday => ("Tuesday", "martes"),
        Weekday::Wednesday => ("Wednesday", "miércoles"),
        Weekday::Thursday => ("Thursday", "jueves"),
        Weekday::Friday => ("Friday", "viernes"),
        Weekday::Saturday => ("Saturday", "sábado"),
        Weekday::Sunday => ("Sunday", "domingo"),
    }
}
