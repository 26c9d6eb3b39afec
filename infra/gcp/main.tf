locals {
  apis = [
    "artifactregistry.googleapis.com",
    "binaryauthorization.googleapis.com",
    "cloudresourcemanager.googleapis.com",
    "container.googleapis.com",
    "containeranalysis.googleapis.com",
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

# One regional Autopilot cluster per environment.
resource "google_container_cluster" "env" {
  for_each            = var.environments
  name                = "kvstack-${each.value}"
  location            = var.region
  enable_autopilot    = true
  deletion_protection = var.deletion_protection
  release_channel {
    channel = "STABLE"
  }
  binary_authorization {
    evaluation_mode = var.binary_authorization ? "PROJECT_SINGLETON_POLICY_ENFORCE" : "DISABLED"
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

# The deployer: pushes images, deploys to the clusters. Nothing else.
resource "google_service_account" "deployer" {
  account_id   = "kvstack-deployer"
  display_name = "kvstack GitHub Actions deployer"
}

resource "google_service_account_iam_member" "deployer_from_github" {
  service_account_id = google_service_account.deployer.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "principalSet://iam.googleapis.com/${google_iam_workload_identity_pool.github.name}/attribute.repository/${var.github_repository}"
}

# Push and read images: on this repository only, not project-wide.
resource "google_artifact_registry_repository_iam_member" "deployer_writer" {
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.writer"
  member     = "serviceAccount:${google_service_account.deployer.email}"
}

# Kubernetes objects in the clusters (deployments, jobs, autoscalers...), no cluster admin.
resource "google_project_iam_member" "deployer_gke" {
  project = var.project
  role    = "roles/container.developer"
  member  = "serviceAccount:${google_service_account.deployer.email}"
}
