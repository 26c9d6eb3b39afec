# Google Cloud set-up for kvstack's pipeline (docs/automation.md). State lives in a versioned GCS
# bucket: `terraform init -backend-config=bucket=BUCKET`.
terraform {
  required_version = ">= 1.6"
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.0"
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
