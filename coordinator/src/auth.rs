//! Bearer-token checks for the two services: clients present the client token, workers the
//! worker token. Tokens are compared in constant time and never logged.

use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// A token; its `Debug` form hides the value so it never reaches a log.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token itself, to send or compare.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Which side a service serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// `recur.v1.Recur`.
    Clients,
    /// `recur.v1.Workers`.
    Workers,
}

/// Checks `authorization: Bearer <token>` against the token of its audience; with no token
/// configured, everyone is let in.
#[derive(Clone)]
pub struct TokenCheck {
    audience: Audience,
    expected: Option<Secret>,
    /// The other audience's token, to tell "wrong service" from "wrong token".
    other: Option<Secret>,
}

impl std::fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCheck")
            .field("audience", &self.audience)
            .field("enabled", &self.expected.is_some())
            .finish()
    }
}

impl TokenCheck {
    /// A check for `audience` with its token and the other audience's.
    pub fn new(audience: Audience, expected: Option<Secret>, other: Option<Secret>) -> Self {
        Self {
            audience,
            expected,
            other,
        }
    }
}

fn matches(given: &[u8], token: &Secret) -> bool {
    given.ct_eq(token.expose().as_bytes()).into()
}

impl Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::as_bytes);
        let who = match self.audience {
            Audience::Clients => "client",
            Audience::Workers => "worker",
        };
        match given {
            None => Err(Status::unauthenticated(format!(
                "this coordinator needs a {who} token (authorization: Bearer <token>)"
            ))),
            Some(g) if matches(g, expected) => Ok(request),
            Some(g) if self.other.as_ref().is_some_and(|o| matches(g, o)) => Err(
                Status::permission_denied(format!("that token is not a {who} token")),
            ),
            Some(_) => Err(Status::unauthenticated(format!("wrong {who} token"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(check: &mut TokenCheck, header: Option<&str>) -> Result<(), tonic::Code> {
        let mut r = Request::new(());
        if let Some(h) = header {
            r.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        check.call(r).map(|_| ()).map_err(|s| s.code())
    }

    #[test]
    fn tokens_are_checked_per_audience() {
        let mut clients = TokenCheck::new(
            Audience::Clients,
            Some(Secret::new("c")),
            Some(Secret::new("w")),
        );
        assert_eq!(format!("{:?}", Secret::new("c")), "Secret(<redacted>)");
        assert_eq!(call(&mut clients, Some("Bearer c")), Ok(()));
        assert_eq!(call(&mut clients, None), Err(tonic::Code::Unauthenticated));
        assert_eq!(
            call(&mut clients, Some("Bearer x")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            call(&mut clients, Some("Bearer w")),
            Err(tonic::Code::PermissionDenied)
        );
        let mut open = TokenCheck::new(Audience::Workers, None, None);
        assert_eq!(call(&mut open, None), Ok(()));
    }
}
