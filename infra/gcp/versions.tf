# Google Cloud set-up for kvstack's pipeline (docs/automation.md). State lives in a versioned GCS
# bucket: `terraform init -backend-config=bucket=BUCKET`.
terraform {
  required_version = ">= 1.6"
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.0"
    }
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = "~> 2.36"
    }
  }
  backend "gcs" {
    prefix = "kvstack/gcp"
  }
}

provider "google" {
  project = var.project
  region  = var.region
}

# The namespaces and their RBAC (main.tf), in the cluster this configuration makes. A fresh
# project needs the cluster first: `terraform apply -target=google_container_cluster.kvstack`,
# then `terraform apply` (docs/automation.md).
data "google_client_config" "current" {}

provider "kubernetes" {
  host                   = "https://${google_container_cluster.kvstack.endpoint}"
  token                  = data.google_client_config.current.access_token
  cluster_ca_certificate = base64decode(google_container_cluster.kvstack.master_auth[0].cluster_ca_certificate)
}
