//! Request bodies: size limit (413), JSON syntax (400) and schema (422) errors that name the
//! offending field.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

/// Bodies at least this long are decoded on the blocking pool, not on the async executor.
const DECODE_OFF_EXECUTOR_BYTES: usize = 256 * 1024;

/// Reads and decodes a JSON body (whatever its content type: `curl -d` sends a form type).
/// Large bodies are decoded on the blocking pool.
pub(crate) async fn read_json<T: DeserializeOwned + Send + 'static>(
    req: Request,
    limit: usize,
) -> Result<T, ApiError> {
    let bytes = Bytes::from_request(req, &()).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit }
        } else {
            ApiError::InvalidRequest {
                message: format!("could not read the request body: {}", rejection.body_text()),
                param: None,
            }
        }
    })?;
    if bytes.len() < DECODE_OFF_EXECUTOR_BYTES {
        return decode(&bytes);
    }
    tokio::task::spawn_blocking(move || decode(&bytes))
        .await
        .map_err(|e| ApiError::Internal(format!("decoding the request body failed: {e}")))?
}

/// Decodes JSON into `T`: syntax errors are 400, schema errors 422 with the field's path.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => ApiError::Unprocessable {
                message: inner.to_string(),
                param: (path != ".").then_some(path),
            },
            _ => ApiError::MalformedJson(inner.to_string()),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct T {
        items: Vec<Item>,
    }
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Item {
        n: u32,
    }

    #[test]
    fn errors_name_the_field() {
        match decode::<T>(br#"{"items": [{"n": 1}, {"n": "x"}]}"#) {
            Err(ApiError::Unprocessable { param, .. }) => {
                assert_eq!(param.as_deref(), Some("items[1].n"))
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            decode::<T>(b"{not json"),
            Err(ApiError::MalformedJson(_))
        ));
        assert!(matches!(decode::<T>(b""), Err(ApiError::MalformedJson(_))));
        assert!(matches!(
            decode::<T>(br#"{"items": []} trailing"#),
            Err(ApiError::MalformedJson(_))
        ));
        assert!(matches!(
            decode::<T>(br#"{}"#),
            Err(ApiError::Unprocessable { .. })
        ));
    }
}
