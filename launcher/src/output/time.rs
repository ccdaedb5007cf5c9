//! Times as vrun prints them (UTC, to the millisecond), with no time-zone database.

/// Nanoseconds since the Unix epoch, now.
pub fn nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// UTC "YYYYmmdd-HHMMSS.mmm" (image file names).
pub fn timestamp() -> String {
    let n = nanos();
    let (y, m, d, hh, mm, ss) = civil((n / 1_000_000_000) as i64);
    format!("{y:04}{m:02}{d:02}-{hh:02}{mm:02}{ss:02}.{:03}", n / 1_000_000 % 1000)
}

/// UTC "YYYY-mm-dd HH:MM:SS" of a Unix time.
pub fn timestamp_of(secs: u64) -> String {
    let (y, m, d, hh, mm, ss) = civil(secs as i64);
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02}:{ss:02}")
}

/// Civil date and time from a Unix time (Howard Hinnant's days-to-civil algorithm).
fn civil(secs: i64) -> (i64, i64, i64, i64, i64, i64) {
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    (y, m, d, rem / 3600, rem / 60 % 60, rem % 60)
}
