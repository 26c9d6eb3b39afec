locals {
  apis = [
    "artifactregistry.googleapis.com",
    "binaryauthorization.googleapis.com",
    "cloudresourcemanager.googleapis.com",
    "container.googleapis.com",
    "containeranalysis.googleapis.com",
    "gkebackup.googleapis.com",
    "iam.googleapis.com",
    "iamcredentials.googleapis.com",
    "sts.googleapis.com",
  ]
}

resource "google_project_service" "apis" {
  for_each = toset(local.apis)
  service  = each.value
  # Turning an API off on destroy can break other things in a shared project.
  disable_on_destroy = false
}

# Images: one repository, tags immutable so a git-SHA tag always names the same digest.
resource "google_artifact_registry_repository" "images" {
  location      = var.region
  repository_id = var.repository_id
  format        = "DOCKER"
  description   = "kvstack service images (pushed by .github/workflows/deploy.yml)"
  docker_config {
    immutable_tags = true
  }
  depends_on = [google_project_service.apis]
}

# One regional Autopilot cluster; each environment is a namespace in it (var.namespaces).
resource "google_container_cluster" "kvstack" {
  name                = var.cluster_name
  location            = var.region
  enable_autopilot    = true
  deletion_protection = var.deletion_protection
  release_channel {
    channel = "STABLE"
  }
  binary_authorization {
    evaluation_mode = var.binary_authorization ? "PROJECT_SINGLETON_POLICY_ENFORCE" : "DISABLED"
  }
  # The agent that takes the scheduled backups below (off by default).
  addons_config {
    gke_backup_agent_config {
      enabled = true
    }
  }
  depends_on = [google_project_service.apis]
}

# Scheduled backups with the platform's own engine, Backup for GKE: every kvstack namespace's
# objects and volume data (a snapshot of each backend disk), every 6 hours, kept 14 days.
# A volume snapshot is crash-consistent, and LMDB is crash-safe by design (each commit is
# fsync'd, pages are copy-on-write): a restored disk opens at its last committed transaction,
# as after a power loss. Replicas are no backup (a delete replicates at once); this is.
# https://cloud.google.com/kubernetes-engine/docs/add-on/backup-for-gke/how-to/backup-plan
resource "google_gke_backup_backup_plan" "kvstack" {
  name     = "kvstack"
  cluster  = google_container_cluster.kvstack.id
  location = var.region
  backup_schedule {
    cron_schedule = var.backup_cron
  }
  retention_policy {
    backup_retain_days = var.backup_retain_days
  }
  backup_config {
    include_volume_data = true
    include_secrets     = false
    selected_namespaces {
      namespaces = values(var.namespaces)
    }
  }
  depends_on = [google_project_service.apis]
}

# Workload Identity Federation: GitHub's OIDC tokens, from this repository only.
resource "google_iam_workload_identity_pool" "github" {
  workload_identity_pool_id = "github"
  display_name              = "GitHub Actions"
  depends_on                = [google_project_service.apis]
}

resource "google_iam_workload_identity_pool_provider" "github" {
  workload_identity_pool_id          = google_iam_workload_identity_pool.github.workload_identity_pool_id
  workload_identity_pool_provider_id = "kvstack"
  display_name                       = "kvstack repository"
  attribute_mapping = {
    "google.subject"        = "assertion.sub"
    "attribute.repository"  = "assertion.repository"
    "attribute.ref"         = "assertion.ref"
    "attribute.environment" = "assertion.environment"
  }
  # Tokens of any other repository are rejected before any role is considered.
  attribute_condition = "assertion.repository == '${var.github_repository}'"
  oidc {
    issuer_uri = "https://token.actions.githubusercontent.com"
  }
}

# The builder: pushes images (deploy.yml's build job, which runs in no environment). Nothing else.
resource "google_service_account" "builder" {
  account_id   = "kvstack-builder"
  display_name = "kvstack GitHub Actions image builder"
}

resource "google_service_account_iam_member" "builder_from_github" {
  service_account_id = google_service_account.builder.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "principalSet://iam.googleapis.com/${google_iam_workload_identity_pool.github.name}/attribute.repository/${var.github_repository}"
}

# Push and read images: on this repository only, not project-wide.
resource "google_artifact_registry_repository_iam_member" "builder_writer" {
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.writer"
  member     = "serviceAccount:${google_service_account.builder.email}"
}

# One deployer per environment, usable only by this repository's jobs that run in that GitHub
# environment (the token's subject names both): a staging job cannot act in production's
# namespace, and production's deployer is reached only past the environment's reviewers.
resource "google_service_account" "deployer" {
  for_each     = var.namespaces
  account_id   = "kvstack-deploy-${each.key}"
  display_name = "kvstack GitHub Actions deployer (${each.key}: namespace ${each.value})"
}

resource "google_service_account_iam_member" "deployer_from_github" {
  for_each           = var.namespaces
  service_account_id = google_service_account.deployer[each.key].name
  role               = "roles/iam.workloadIdentityUser"
  member             = "principal://iam.googleapis.com/${google_iam_workload_identity_pool.github.name}/subject/repo:${var.github_repository}:environment:${each.key}"
}

# Read images (digests, cosign signatures) from the one repository; never write.
resource "google_artifact_registry_repository_iam_member" "deployer_reader" {
  for_each   = var.namespaces
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = "serviceAccount:${google_service_account.deployer[each.key].email}"
}

# Find the cluster (get-credentials) and nothing more through IAM: IAM roles on GKE apply to
# every namespace, so what a deployer may change is granted by Kubernetes RBAC below, in its
# own namespace only.
resource "google_project_iam_member" "deployer_cluster_viewer" {
  for_each = var.namespaces
  project  = var.project
  role     = "roles/container.clusterViewer"
  member   = "serviceAccount:${google_service_account.deployer[each.key].email}"
}

# -- Inside the cluster: the namespaces and what each deployer may do there -------------------

# The backend's disks (deploy/overlays/gke/storage.yaml names this class): SSD persistent disks
# replicated synchronously across two zones, so backend-0 can start in the other zone with its
# data when its zone fails. In a regional cluster GKE picks the second zone, so no
# allowedTopologies. Cluster-wide, hence here and not in the release (a deployer may change its
# own namespace only). Retain: deleting a claim never deletes the data.
# https://cloud.google.com/kubernetes-engine/docs/how-to/persistent-volumes/regional-pd
resource "kubernetes_storage_class_v1" "regional_ssd" {
  metadata {
    name   = "kvstack-regional-ssd"
    labels = { "app.kubernetes.io/part-of" = "kvstack" }
  }
  storage_provisioner    = "pd.csi.storage.gke.io"
  reclaim_policy         = "Retain"
  volume_binding_mode    = "WaitForFirstConsumer"
  allow_volume_expansion = true
  parameters = {
    type               = "pd-ssd"
    "replication-type" = "regional-pd"
  }
}

# Made here so the role bindings have somewhere to live; `kvstack deploy` applies the same
# object (same labels, from deploy/base/namespace.yaml renamed by Kustomize's `namespace:`).
resource "kubernetes_namespace_v1" "env" {
  for_each = var.namespaces
  metadata {
    name = each.value
    labels = {
      "app.kubernetes.io/part-of"                  = "kvstack"
      "pod-security.kubernetes.io/enforce"         = "restricted"
      "pod-security.kubernetes.io/audit"           = "restricted"
      "pod-security.kubernetes.io/warn"            = "restricted"
      "pod-security.kubernetes.io/enforce-version" = "latest"
    }
  }
}

# What `kvstack pipeline release gke` and the operations workflow do: the kinds the manifests
# hold, rollouts (ReplicaSets, ControllerRevisions), scale, the smoke Job's pods and logs.
resource "kubernetes_role_v1" "deployer" {
  for_each = var.namespaces
  metadata {
    name      = "kvstack-deployer"
    namespace = kubernetes_namespace_v1.env[each.key].metadata[0].name
  }
  rule {
    api_groups = ["apps"]
    resources  = ["deployments", "statefulsets", "deployments/scale", "statefulsets/scale"]
    verbs      = ["get", "list", "watch", "create", "update", "patch", "delete"]
  }
  rule {
    api_groups = ["apps"]
    resources  = ["replicasets", "controllerrevisions"]
    verbs      = ["get", "list", "watch"]
  }
  rule {
    api_groups = ["batch"]
    resources  = ["jobs"]
    verbs      = ["get", "list", "watch", "create", "update", "patch", "delete"]
  }
  rule {
    api_groups = [""]
    resources  = ["services"]
    verbs      = ["get", "list", "watch", "create", "update", "patch", "delete"]
  }
  rule {
    api_groups = [""]
    resources  = ["pods", "pods/log", "events"]
    verbs      = ["get", "list", "watch"]
  }
  rule {
    api_groups = ["autoscaling"]
    resources  = ["horizontalpodautoscalers"]
    verbs      = ["get", "list", "watch", "create", "update", "patch", "delete"]
  }
  rule {
    api_groups = ["policy"]
    resources  = ["poddisruptionbudgets"]
    verbs      = ["get", "list", "watch", "create", "update", "patch", "delete"]
  }
  rule {
    api_groups = ["networking.k8s.io"]
    resources  = ["networkpolicies"]
    verbs      = ["get", "list", "watch", "create", "update", "patch", "delete"]
  }
  rule {
    api_groups = ["monitoring.googleapis.com"]
    resources  = ["podmonitorings"]
    verbs      = ["get", "list", "watch", "create", "update", "patch", "delete"]
  }
}

resource "kubernetes_role_binding_v1" "deployer" {
  for_each = var.namespaces
  metadata {
    name      = "kvstack-deployer"
    namespace = kubernetes_namespace_v1.env[each.key].metadata[0].name
  }
  role_ref {
    api_group = "rbac.authorization.k8s.io"
    kind      = "Role"
    name      = kubernetes_role_v1.deployer[each.key].metadata[0].name
  }
  subject {
    api_group = "rbac.authorization.k8s.io"
    kind      = "User"
    name      = google_service_account.deployer[each.key].email
  }
}

# The release applies its Namespace object too: read and patch that one namespace, by name.
resource "kubernetes_cluster_role_v1" "deployer_namespace" {
  for_each = var.namespaces
  metadata {
    name = "kvstack-deployer-${each.key}-namespace"
  }
  rule {
    api_groups     = [""]
    resources      = ["namespaces"]
    resource_names = [each.value]
    verbs          = ["get", "patch"]
  }
}

resource "kubernetes_cluster_role_binding_v1" "deployer_namespace" {
  for_each = var.namespaces
  metadata {
    name = "kvstack-deployer-${each.key}-namespace"
  }
  role_ref {
    api_group = "rbac.authorization.k8s.io"
    kind      = "ClusterRole"
    name      = kubernetes_cluster_role_v1.deployer_namespace[each.key].metadata[0].name
  }
  subject {
    api_group = "rbac.authorization.k8s.io"
    kind      = "User"
    name      = google_service_account.deployer[each.key].email
  }
}
