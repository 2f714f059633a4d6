//! A blocking client of etcd's v3 API, through the JSON gateway etcd serves on its client
//! port (`POST /v3/...`, keys and values in base64, 64-bit numbers as strings): the few calls
//! membership and ownership need (docs/ha.md, "Keys"). No async runtime: each call is one
//! HTTP request with a timeout, to the endpoint that answered last, then to the others.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use thiserror::Error;

/// A lease's id.
pub type LeaseId = i64;

/// What a call to etcd can meet.
#[derive(Debug, Error)]
pub enum EtcdError {
    /// No endpoint answered.
    #[error("etcd cannot be reached at {endpoints}: {last}")]
    Unreachable {
        /// Every endpoint tried.
        endpoints: String,
        /// The last failure.
        last: String,
    },
    /// etcd answered with an error.
    #[error("etcd refused {call}: {message}")]
    Refused {
        /// The call.
        call: &'static str,
        /// etcd's message.
        message: String,
    },
    /// An answer that is not what the API gives.
    #[error("etcd's answer to {call} is not understood: {why}")]
    Malformed {
        /// The call.
        call: &'static str,
        /// What is wrong with it.
        why: String,
    },
}

/// A key and its value as etcd holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision that created the key (0 never: a key that exists was created).
    pub create_revision: i64,
    pub mod_revision: i64,
    /// The lease the key is attached to, 0 for none.
    pub lease: LeaseId,
}

/// The client.
pub struct Etcd {
    http: ureq::Agent,
    endpoints: Vec<String>,
    /// The endpoint that answered last.
    current: AtomicUsize,
}

impl Etcd {
    /// A client of `endpoints` (`http://host:port`), each call bounded by `timeout`.
    pub fn new(endpoints: &[String], timeout: Duration) -> Etcd {
        let http = ureq::AgentBuilder::new().timeout_connect(timeout).timeout(timeout).build();
        let endpoints = endpoints.iter().map(|e| e.trim_end_matches('/').to_owned()).collect();
        Etcd { http, endpoints, current: AtomicUsize::new(0) }
    }

    /// One call: the current endpoint first, then each other once.
    fn call(&self, call: &'static str, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let n = self.endpoints.len();
        let first = self.current.load(Ordering::Relaxed);
        let mut last = String::from("no endpoint");
        for i in 0..n {
            let at = (first + i) % n;
            let url = format!("{}{path}", self.endpoints[at]);
            match self.http.post(&url).send_string(&body.to_string()) {
                Ok(resp) => {
                    self.current.store(at, Ordering::Relaxed);
                    let text = resp.into_string().map_err(|e| EtcdError::Malformed { call, why: e.to_string() })?;
                    return serde_json::from_str(&text).map_err(|e| EtcdError::Malformed { call, why: format!("{e}: {text}") });
                }
                Err(ureq::Error::Status(code, resp)) => {
                    let text = resp.into_string().unwrap_or_default();
                    let message = serde_json::from_str::<Value>(&text)
                        .ok()
                        .and_then(|v| v.get("message").or_else(|| v.get("error")).and_then(Value::as_str).map(str::to_owned))
                        .unwrap_or(text);
                    if code >= 500 && message.contains("leader") {
                        // A member without a leader: another may have one.
                        last = format!("{url}: {message}");
                        continue;
                    }
                    return Err(EtcdError::Refused { call, message: format!("HTTP {code}: {message}") });
                }
                // ureq names the URL itself.
                Err(e) => last = e.to_string(),
            }
        }
        Err(EtcdError::Unreachable { endpoints: self.endpoints.join(", "), last })
    }

    /// Grants a lease of `ttl`.
    pub fn grant(&self, ttl: Duration) -> Result<LeaseId, EtcdError> {
        let v = self.call("lease grant", "/v3/lease/grant", &json!({ "TTL": ttl.as_secs() }))?;
        int(&v, "ID").filter(|&id| id != 0).ok_or_else(|| malformed("lease grant", &v))
    }

    /// Renews a lease: its TTL from now, or `None` if it has expired (or never was).
    pub fn keep_alive(&self, lease: LeaseId) -> Result<Option<Duration>, EtcdError> {
        let v = self.call("lease keep-alive", "/v3/lease/keepalive", &json!({ "ID": lease.to_string() }))?;
        let result = v.get("result").ok_or_else(|| malformed("lease keep-alive", &v))?;
        let ttl = int(result, "TTL").unwrap_or(0);
        Ok((ttl > 0).then(|| Duration::from_secs(u64::try_from(ttl).unwrap_or(0))))
    }

    /// Revokes a lease: its keys go at once.
    pub fn revoke(&self, lease: LeaseId) -> Result<(), EtcdError> {
        self.call("lease revoke", "/v3/lease/revoke", &json!({ "ID": lease.to_string() })).map(drop)
    }

    /// Puts `key` (attached to `lease` unless 0); returns the revision.
    pub fn put(&self, key: &str, value: &[u8], lease: LeaseId) -> Result<i64, EtcdError> {
        let v =
            self.call("put", "/v3/kv/put", &json!({ "key": B64.encode(key), "value": B64.encode(value), "lease": lease.to_string() }))?;
        Ok(revision(&v))
    }

    /// Creates `key` attached to `lease` if it does not exist: `Ok(create_revision)` of the
    /// new key, or `Err(existing)` with the key as it is.
    pub fn create(&self, key: &str, value: &[u8], lease: LeaseId) -> Result<Result<i64, KeyValue>, EtcdError> {
        let k = B64.encode(key);
        let body = json!({
            "compare": [{ "key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0" }],
            "success": [{ "request_put": { "key": k, "value": B64.encode(value), "lease": lease.to_string() } }],
            "failure": [{ "request_range": { "key": k } }],
        });
        let v = self.call("create", "/v3/kv/txn", &body)?;
        if v.get("succeeded").and_then(Value::as_bool).unwrap_or(false) {
            // The transaction's revision is the one that created the key.
            return Ok(Ok(revision(&v)));
        }
        let existing = v.pointer("/responses/0/response_range/kvs/0").map(key_value).transpose()?.ok_or_else(|| malformed("create", &v))?;
        Ok(Err(existing))
    }

    /// Deletes `key` if it is still the one created at `create_revision`; whether it was.
    pub fn delete_if_created(&self, key: &str, create_revision: i64) -> Result<bool, EtcdError> {
        let k = B64.encode(key);
        let body = json!({
            "compare": [{ "key": k, "target": "CREATE", "result": "EQUAL", "create_revision": create_revision.to_string() }],
            "success": [{ "request_delete_range": { "key": k } }],
        });
        let v = self.call("delete", "/v3/kv/txn", &body)?;
        Ok(v.get("succeeded").and_then(Value::as_bool).unwrap_or(false))
    }

    /// Every key under `prefix`, with the store's revision at the read.
    pub fn get_prefix(&self, prefix: &str) -> Result<(i64, Vec<KeyValue>), EtcdError> {
        let body = json!({ "key": B64.encode(prefix), "range_end": B64.encode(prefix_end(prefix)) });
        let v = self.call("range", "/v3/kv/range", &body)?;
        let kvs = match v.get("kvs") {
            None => Vec::new(),
            Some(Value::Array(a)) => a.iter().map(key_value).collect::<Result<_, _>>()?,
            Some(_) => return Err(malformed("range", &v)),
        };
        Ok((revision(&v), kvs))
    }
}

/// The end of the range of keys that start with `prefix`: the prefix with its last byte one
/// more.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn malformed(call: &'static str, v: &Value) -> EtcdError {
    EtcdError::Malformed { call, why: v.to_string() }
}

/// A 64-bit number of the gateway's JSON (a string; a number in some versions).
fn int(v: &Value, field: &str) -> Option<i64> {
    match v.get(field)? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn revision(v: &Value) -> i64 {
    v.get("header").and_then(|h| int(h, "revision")).unwrap_or(0)
}

fn key_value(v: &Value) -> Result<KeyValue, EtcdError> {
    let bad = || malformed("range", v);
    let decode = |field: &str| -> Result<Vec<u8>, EtcdError> {
        match v.get(field) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => B64.decode(s).map_err(|_| bad()),
            Some(_) => Err(bad()),
        }
    };
    let key = String::from_utf8(decode("key")?).map_err(|_| bad())?;
    Ok(KeyValue {
        key,
        value: decode("value")?,
        create_revision: int(v, "create_revision").ok_or_else(bad)?,
        mod_revision: int(v, "mod_revision").unwrap_or(0),
        lease: int(v, "lease").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_of_a_prefix_ends_just_past_it() {
        assert_eq!(prefix_end("/hs/"), b"/hs0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }

    #[test]
    fn an_unreachable_etcd_is_named_with_every_endpoint() {
        let e = Etcd::new(&["http://127.0.0.1:1".to_owned(), "http://127.0.0.1:2/".to_owned()], Duration::from_millis(200));
        let err = e.grant(Duration::from_secs(5)).unwrap_err().to_string();
        assert!(err.contains("http://127.0.0.1:1, http://127.0.0.1:2") && err.contains("cannot be reached"), "{err}");
    }
}
