//! End-to-end test of the directory's dashboard: the real directory serves the page and its
//! script on its admin port; the script, run under Node.js, turns that directory's live
//! `/v1/services` and `/v1/routes` (fixed instances, a scaled service after its cold start, a
//! hostile label) into the rows the page shows; and headless Chromium loads the page under the
//! admin port's Content-Security-Policy and draws those rows, the hostile label as text.

use std::time::Duration;

use serde_json::Value;
use usher_shared::admin::SECURITY_HEADERS;
use usher_tests::{
    admin_json, browser_dom, dashboard_model, http, optional_tool, scaled_version, wait_for_up,
    Mesh,
};

/// A label value that would run script if the page wrote it as HTML.
const HOSTILE: &str = "<img src=x onerror=alert(1)>";

/// The row of `rows` whose first cells are `first`.
fn row<'a>(rows: &'a Value, first: &[&str]) -> &'a Vec<Value> {
    rows.as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_array)
        .find(|r| first.iter().zip(r.iter()).all(|(want, got)| got == want))
        .unwrap_or_else(|| panic!("no row starting {first:?} in {rows:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_live_table_load_and_scaling() {
    let mesh = Mesh::new().unwrap();
    let _directory = mesh
        .start_directory_with_config("directory", &scaled_version("hello", "v1", 0))
        .await
        .unwrap();
    let label = format!("note={HOSTILE}");
    let _web1 = mesh
        .start_agent("web-1", "web", &["--id", "web-1", "--label", &label])
        .unwrap();
    let _web2 = mesh
        .start_agent("web-2", "web", &["--id", "web-2"])
        .unwrap();
    let addrs = mesh.sidecar_addrs("a");
    let _sidecar = mesh.start_sidecar("sidecar", &addrs).await.unwrap();
    wait_for_up(&addrs.admin(), "web", 2, Duration::from_secs(20))
        .await
        .unwrap();
    // A cold start of the scaled service, so there is a scaling decision to show.
    let r = http::get(&addrs.proxy(), "hello", "/").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    // The page and its assets, with the admin port's security headers.
    let admin = mesh.directory.admin();
    let page = http::get(&admin, "localhost", "/").await.unwrap();
    assert_eq!(page.status, 200);
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    for (name, value) in SECURITY_HEADERS {
        assert_eq!(page.headers[name], value, "{name}");
    }
    assert!(page.text().contains(r#"<script src="/dashboard.js""#));
    let css = http::get(&admin, "localhost", "/dashboard.css")
        .await
        .unwrap();
    assert_eq!(css.status, 200);
    let script = http::get(&admin, "localhost", "/dashboard.js")
        .await
        .unwrap();
    assert_eq!(script.status, 200);
    assert_eq!(
        script.headers["content-type"],
        "text/javascript; charset=utf-8"
    );

    // What the script makes of the live data.
    if let Some(node) = optional_tool("node") {
        model_of_the_live_data(&node, &admin, &script.body, &label).await;
    }

    // What a browser draws: the script ran (the CSP let it), filled every table, and wrote the
    // hostile label as text, so the page holds no element it would have made.
    let Some(chromium) = optional_tool("chromium") else {
        return;
    };
    let dom = browser_dom(&chromium, &format!("http://{admin}/"))
        .await
        .unwrap();
    for drawn in [
        "<dt>instances</dt><dd>3 up of 3</dd>",
        "<td>web-1</td>",
        r#"<td class="state state-up">up</td>"#,
        "<td>hello v1</td><td>0 → 1</td>",
        r#"<form id="login" hidden="">"#,
        r#"<p id="error" class="error" hidden="">"#,
    ] {
        assert!(dom.contains(drawn), "{drawn} not in\n{dom}");
    }
    assert!(
        dom.contains("<td>note=&lt;img src=x onerror=alert(1)&gt;</td>"),
        "{dom}"
    );
    assert!(!dom.contains("<img"), "{dom}");
}

async fn model_of_the_live_data(node: &std::path::Path, admin: &str, script: &[u8], label: &str) {
    let services = admin_json(admin, "/v1/services").await.unwrap();
    let routes = admin_json(admin, "/v1/routes").await.unwrap();
    let now_ms = usher_shared::unix_millis();
    let model = dashboard_model(node, script, &services, &routes, now_ms).unwrap();

    let summary = &model["summary"];
    assert_eq!(
        row(summary, &["revision"])[1],
        routes["revision"].to_string()
    );
    assert_eq!(row(summary, &["instances"])[1], "3 up of 3", "{summary:#}");
    assert_eq!(row(summary, &["sidecar subscriptions"])[1], "1");

    // Service versions: up / instances, ..., target, ideal, started, scheduler, last change.
    let web = row(&model["services"], &["web", "v1"]);
    assert_eq!(web[2], "2 / 2");
    assert_eq!(web[7], "—");
    assert_eq!(web[10], "not scaled");
    let hello = row(&model["services"], &["hello", "v1"]);
    assert_eq!(hello[2], "1 / 1");
    assert_eq!(hello[7], "1", "target: {hello:?}");
    assert_eq!(hello[10], "process");
    let last = hello[11].as_str().unwrap();
    assert!(
        last.starts_with("0 → 1, ") && last.contains("cold start"),
        "{last}"
    );

    // Instances: the address and state from the table, the hostile label as plain text.
    let instance = |id: &str| {
        routes["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == id)
            .unwrap()
            .clone()
    };
    let web1 = row(&model["instances"], &["web", "v1", "web-1"]);
    assert_eq!(web1[3], instance("web-1")["address"]);
    assert_eq!(web1[4], "up");
    assert_eq!(web1[9], label);
    let web2 = row(&model["instances"], &["web", "v1", "web-2"]);
    assert_eq!(web2[9], "");
    assert_eq!(model["instances"].as_array().unwrap().len(), 3);
    assert!(web1[8].as_str().unwrap().ends_with(" ago"), "{web1:?}");
    // An instance whose withdrawal self-preservation holds says so beside its last heartbeat.
    let mut held = routes.clone();
    let mut web1_held = instance("web-1");
    web1_held["withdrawal_held"] = Value::Bool(true);
    held["instances"] = Value::Array(vec![web1_held]);
    let held = dashboard_model(node, script, &services, &held, now_ms).unwrap();
    let last_heartbeat = &row(&held["instances"], &["web", "v1", "web-1"])[8];
    assert!(
        last_heartbeat
            .as_str()
            .unwrap()
            .ends_with(" ago (TTL lapsed, withdrawal held)"),
        "{last_heartbeat}"
    );

    // The instance list is read every 2 s at this size, every 20 s at 10,000 instances.
    assert_eq!(model["routesEveryMs"], 2000);
    let mut big = routes.clone();
    big["instances"] = Value::Array(vec![instance("web-1"); 10_000]);
    let big = dashboard_model(node, script, &services, &big, now_ms).unwrap();
    assert_eq!(big["routesEveryMs"], 20_000);
    assert_eq!(big["instances"].as_array().unwrap().len(), 10_000);

    // Scaling decisions, newest first: the cold start.
    let decision = model["decisions"][0].as_array().unwrap();
    assert_eq!(decision[2], "hello v1");
    assert_eq!(decision[3], "0 → 1");
    assert!(
        decision[5].as_str().unwrap().contains("cold start"),
        "{decision:?}"
    );
}
