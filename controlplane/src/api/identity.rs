//! The `Identity` service: load and show the cluster CA, make, list and
//! revoke join tokens, list issued certificates. The work is in
//! [`crate::ca`]; this is the gRPC edge.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use trellis_proto::admin as pb;
use trellis_proto::admin::identity_server::Identity as IdentityApi;

use crate::node::Node;
use crate::system::{CertRecord, TokenRecord};

pub struct IdentityService {
    node: Arc<Node>,
}

impl IdentityService {
    pub fn new(node: Arc<Node>) -> Self {
        IdentityService { node }
    }

    fn header(&self) -> Option<pb::ResponseHeader> {
        Some(self.node.header(self.node.store.revision()))
    }
}

fn token_info(t: TokenRecord, uses: u64) -> pb::JoinTokenInfo {
    pb::JoinTokenInfo {
        id: t.id,
        namespace: t.namespace,
        service: t.service,
        created_unix_ms: t.created_unix_ms,
        expires_unix_ms: t.expires_unix_ms,
        description: t.description,
        uses,
    }
}

fn cert_record(c: CertRecord) -> pb::CertificateRecord {
    pb::CertificateRecord {
        serial: c.serial,
        spiffe_id: c.spiffe_id,
        not_before_unix_ms: c.not_before_unix_ms,
        not_after_unix_ms: c.not_after_unix_ms,
        issued_by_node: c.issued_by_node,
        reason: c.reason,
        token_id: c.token_id,
    }
}

#[tonic::async_trait]
impl IdentityApi for IdentityService {
    #[tracing::instrument(level = "info", skip_all)]
    async fn load_ca(
        &self,
        req: Request<pb::LoadCaRequest>,
    ) -> Result<Response<pb::LoadCaResponse>, Status> {
        let r = req.into_inner();
        let (trust_domain, loaded) =
            crate::ca::load_ca(&self.node, &r.cert_pem, &r.key_pem).await?;
        Ok(Response::new(pb::LoadCaResponse {
            header: self.header(),
            trust_domain,
            loaded,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn get_ca(
        &self,
        _req: Request<pb::GetCaRequest>,
    ) -> Result<Response<pb::GetCaResponse>, Status> {
        let (cert_pem, trust_domain) = crate::ca::get_ca(&self.node).await?;
        Ok(Response::new(pb::GetCaResponse {
            header: self.header(),
            cert_pem,
            trust_domain,
        }))
    }

    #[tracing::instrument(level = "info", skip_all, fields(namespace = %req.get_ref().namespace, service = %req.get_ref().service))]
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let (token, record) = crate::ca::create_token(&self.node, req.into_inner()).await?;
        Ok(Response::new(pb::CreateTokenResponse {
            header: self.header(),
            token: token.to_string(),
            info: Some(token_info(record, 0)),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_tokens(
        &self,
        _req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let tokens = crate::ca::list_tokens(&self.node).await?;
        let certs = crate::ca::list_certs(&self.node).await?;
        let tokens = tokens
            .into_iter()
            .map(|t| {
                let uses = certs.iter().filter(|c| c.token_id == t.id).count() as u64;
                token_info(t, uses)
            })
            .collect();
        Ok(Response::new(pb::ListTokensResponse {
            header: self.header(),
            tokens,
        }))
    }

    #[tracing::instrument(level = "info", skip_all, fields(id = %req.get_ref().id))]
    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let revoked = crate::ca::revoke_token(&self.node, &req.into_inner().id).await?;
        Ok(Response::new(pb::RevokeTokenResponse {
            header: self.header(),
            revoked,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_certificates(
        &self,
        _req: Request<pb::ListCertificatesRequest>,
    ) -> Result<Response<pb::ListCertificatesResponse>, Status> {
        let mut certs = crate::ca::list_certs(&self.node).await?;
        certs.sort_by_key(|c| (c.not_after_unix_ms, c.serial.clone()));
        Ok(Response::new(pb::ListCertificatesResponse {
            header: self.header(),
            certificates: certs.into_iter().map(cert_record).collect(),
        }))
    }
}
