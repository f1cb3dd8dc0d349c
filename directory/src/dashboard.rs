//! The directory's dashboard: one page on the admin port (`GET /`), with its script
//! (`GET /dashboard.js`) and style (`GET /dashboard.css`), embedded in the binary.
//!
//! The page holds no data. Its script reads `GET /v1/services` every 2 s (`REFRESH_MS` in the
//! script) and `GET /v1/routes` as often up to 1,000 instances, less often beyond
//! (`routesEvery`: 20 s at 10,000, where building it takes the directory's thread about
//! 10 ms, and which holds the table's summary and instances), and shows the table's epoch, revision and grace
//! period, each service version's instances, load and scaling, each instance, and the latest
//! scaling decisions. When the admin port needs the admin token for reads (bound off
//! loopback), the page asks for it and sends it as `Authorization: Bearer` from then on
//! (kept in the tab's `sessionStorage`), so the assets themselves need no token.
//!
//! Safety: values from the network (instance ids, labels, addresses) reach the page only as
//! text nodes, never as HTML, and the admin port's `Content-Security-Policy`
//! ([`usher_shared::admin::SECURITY_HEADERS`]) allows no inline script, so a hostile name
//! cannot run code in an operator's browser.

use http::StatusCode;
use usher_shared::admin::AdminResponse;

const INDEX: &str = include_str!("dashboard/index.html");
/// The dashboard's script: in a browser it draws the page; under Node.js (`require`) it
/// exports `model(services, routes, nowMs)`, the rows the page shows, so tests can check them.
pub const SCRIPT: &str = include_str!("dashboard/dashboard.js");
const STYLE: &str = include_str!("dashboard/dashboard.css");

/// The paths of the dashboard's assets.
pub const PATHS: [&str; 4] = ["/", "/dashboard", "/dashboard.js", "/dashboard.css"];

/// Whether `path` is one of the dashboard's assets (which hold no data, so they are served
/// without the admin token).
pub fn is_asset(path: &str) -> bool {
    PATHS.contains(&path)
}

/// The asset at `path` (one of [`PATHS`]); `None` for any other path.
pub fn asset(path: &str) -> Option<AdminResponse> {
    let (content_type, body) = match path {
        "/" | "/dashboard" => ("text/html; charset=utf-8", INDEX),
        "/dashboard.js" => ("text/javascript; charset=utf-8", SCRIPT),
        "/dashboard.css" => ("text/css; charset=utf-8", STYLE),
        _ => return None,
    };
    Some(AdminResponse {
        status: StatusCode::OK,
        content_type,
        body: body.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_served_with_its_type() {
        for path in PATHS {
            let reply = asset(path).unwrap();
            assert_eq!(reply.status, StatusCode::OK);
            assert!(!reply.body.is_empty(), "{path}");
        }
        assert!(asset("/").unwrap().content_type.starts_with("text/html"));
        assert!(asset("/nope").is_none());
    }

    /// The page loads exactly the served script and style, by the paths served, with no inline
    /// script or style (the admin port's CSP would block them).
    #[test]
    fn the_page_names_its_assets_and_inlines_nothing() {
        assert!(INDEX.contains(r#"<script src="/dashboard.js" defer></script>"#));
        assert!(INDEX.contains(r#"<link rel="stylesheet" href="/dashboard.css">"#));
        assert_eq!(INDEX.matches("<script").count(), 1);
        assert!(!INDEX.contains("<style"));
        assert!(!INDEX.contains(" style="));
        let handlers = INDEX.match_indices(" on").filter(|(at, _)| {
            let rest = &INDEX[at + 3..];
            let name = rest.len()
                - rest
                    .trim_start_matches(|c: char| c.is_ascii_lowercase())
                    .len();
            name > 0 && rest[name..].starts_with('=')
        });
        assert_eq!(handlers.count(), 0, "no inline event handlers");
    }

    /// Values from the network are written as text only: the script never parses HTML.
    #[test]
    fn the_script_writes_text_not_html() {
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "Function(",
        ] {
            assert!(!SCRIPT.contains(sink), "dashboard.js uses {sink}");
        }
    }
}
