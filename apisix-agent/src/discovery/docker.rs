//! Follows Docker containers through the Docker API (bollard): lists the running containers,
//! then follows the event stream (start, die, destroy, restart…), refreshing the list on each
//! container event and nudging the `/proc` scanner so a new container is profiled within
//! seconds. When the socket is absent or the daemon goes away, the last list is dropped (host
//! processes keep being profiled), that is logged once, and the connection is retried with
//! exponential backoff.
//!
//! Hooks: the Docker socket (`discovery.docker.socket`). Metrics: none.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock, mpsc},
    time::Duration,
};

use bollard::{
    API_DEFAULT_VERSION, Docker,
    query_parameters::{EventsOptions, ListContainersOptions},
};
use futures_util::StreamExt as _;
use globset::GlobSet;

use super::globset;
use crate::config;

/// One running container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub name: String,
    pub image: String,
    /// Whether the selectors of the config pick it.
    pub selected: bool,
}

/// Containers known from the Docker API, by full id.
#[derive(Debug, Default, Clone)]
pub struct Containers {
    /// Whether the Docker API answered the last time it was asked.
    pub connected: bool,
    pub by_id: HashMap<String, Container>,
}

impl Containers {
    /// The container with full id `id`.
    pub fn get(&self, id: &str) -> Option<&Container> {
        self.by_id.get(id)
    }
}

/// Shared view of the containers.
pub type SharedContainers = Arc<RwLock<Containers>>;

/// The container selectors of the config.
#[derive(Debug)]
pub struct Selector {
    names: GlobSet,
    any_name: bool,
    images: GlobSet,
    labels: Vec<(String, GlobSet)>,
    any_luajit: bool,
}

/// Errors of the Docker follower.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("bad container selector in discovery.docker")]
    Glob {
        #[source]
        source: globset::Error,
    },
    #[error("Docker API at {socket}")]
    Api {
        socket: String,
        #[source]
        source: bollard::errors::Error,
    },
}

impl Selector {
    /// Selectors of `cfg`.
    pub fn new(cfg: &config::Docker) -> Result<Self, DockerError> {
        let g = |p: &[String]| globset(p).map_err(|source| DockerError::Glob { source });
        Ok(Self {
            names: g(&cfg.names)?,
            any_name: cfg.names.is_empty(),
            images: g(&cfg.images)?,
            labels: cfg
                .labels
                .iter()
                .map(|(k, v)| Ok((k.clone(), g(std::slice::from_ref(v))?)))
                .collect::<Result<_, DockerError>>()?,
            any_luajit: cfg.any_luajit,
        })
    }

    /// Whether a container is selected. Its processes are still only profiled when they
    /// match the process names and load LuaJIT.
    pub fn selects(&self, name: &str, image: &str, labels: &HashMap<String, String>) -> bool {
        if !self.any_name && !self.names.is_match(name) {
            return false;
        }
        let labels_ok = self
            .labels
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|value| v.is_match(value)));
        labels_ok && (self.any_luajit || self.images.is_match(image))
    }
}

async fn list(docker: &Docker, selector: &Selector) -> Result<Containers, bollard::errors::Error> {
    let summaries = docker
        .list_containers(Some(ListContainersOptions {
            all: false,
            ..Default::default()
        }))
        .await?;
    let mut by_id = HashMap::new();
    for s in summaries {
        let Some(id) = s.id else { continue };
        let name = s
            .names
            .as_ref()
            .and_then(|n| n.first())
            .map(|n| n.trim_start_matches('/').to_owned())
            .unwrap_or_default();
        let image = s.image.unwrap_or_default();
        let labels = s.labels.unwrap_or_default();
        let selected = selector.selects(&name, &image, &labels);
        by_id.insert(
            id,
            Container {
                name,
                image,
                selected,
            },
        );
    }
    Ok(Containers {
        connected: true,
        by_id,
    })
}

/// One connection: list, then follow events until the stream fails.
async fn session(
    socket: &str,
    selector: &Selector,
    state: &SharedContainers,
    nudge: &mpsc::Sender<()>,
) -> Result<(), DockerError> {
    let api = |source| DockerError::Api {
        socket: socket.to_owned(),
        source,
    };
    let docker = Docker::connect_with_unix(socket, 30, API_DEFAULT_VERSION).map_err(api)?;
    docker.ping().await.map_err(api)?;
    let mut events = docker.events(Some(EventsOptions {
        filters: Some(HashMap::from([(
            "type".to_owned(),
            vec!["container".to_owned()],
        )])),
        ..Default::default()
    }));
    let refresh = |c: Containers| {
        let n = c.by_id.len();
        if let Ok(mut s) = state.write() {
            *s = c;
        }
        let _ = nudge.send(());
        n
    };
    let n = refresh(list(&docker, selector).await.map_err(api)?);
    tracing::info!(socket, containers = n, "following Docker containers");
    while let Some(event) = events.next().await {
        let event = event.map_err(api)?;
        let action = event.action.unwrap_or_default();
        let id = event.actor.and_then(|a| a.id).unwrap_or_default();
        if matches!(
            action.as_str(),
            "start" | "restart" | "die" | "stop" | "kill" | "destroy" | "pause" | "unpause"
        ) {
            tracing::debug!(action, container = %id.get(..12).unwrap_or(&id), "docker event");
            refresh(list(&docker, selector).await.map_err(api)?);
        }
    }
    Ok(())
}

/// Follows Docker forever (until the runtime shuts down).
pub async fn follow(
    cfg: config::Docker,
    selector: Selector,
    state: SharedContainers,
    nudge: mpsc::Sender<()>,
) {
    let mut backoff = Duration::from_secs(1);
    let mut warned = false;
    loop {
        let result = session(&cfg.socket, &selector, &state, &nudge).await;
        let was_connected = state.read().map(|s| s.connected).unwrap_or(false);
        if let Ok(mut s) = state.write() {
            *s = Containers::default();
        }
        let _ = nudge.send(());
        if was_connected {
            backoff = Duration::from_secs(1);
            warned = false;
        }
        let reason = match &result {
            Ok(()) => "the event stream ended".to_owned(),
            Err(e) => format!("{e}: {}", error_chain(e)),
        };
        if warned {
            tracing::debug!(reason, retry_in = ?backoff, "Docker still unavailable");
        } else {
            tracing::warn!(
                reason,
                "Docker API unavailable; profiling host processes, reconnecting with backoff"
            );
            warned = true;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(yaml: &str) -> Selector {
        let cfg: config::Docker = match serde_yaml::from_str(yaml) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        match Selector::new(&cfg) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn default_selects_apisix_images_and_any_luajit_container() {
        let s = selector("{}");
        let none = HashMap::new();
        assert!(s.selects("gw", "apache/apisix:3.9.0-debian", &none));
        assert!(s.selects("web", "openresty/openresty", &none));
    }

    #[test]
    fn image_globs_apply_without_any_luajit() {
        let s = selector("any_luajit: false\n");
        let none = HashMap::new();
        assert!(s.selects("gw", "apache/apisix:3.9.0-debian", &none));
        assert!(!s.selects("web", "openresty/openresty", &none));
    }

    #[test]
    fn names_and_labels_restrict() {
        let s = selector("names: ['gw-*']\nlabels: {tier: 'edge*'}\n");
        let edge = HashMap::from([("tier".to_owned(), "edge-eu".to_owned())]);
        let none = HashMap::new();
        assert!(s.selects("gw-1", "x", &edge));
        assert!(!s.selects("db", "x", &edge));
        assert!(!s.selects("gw-1", "x", &none));
    }
}
