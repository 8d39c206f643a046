# The store: a private, versioned, KMS-encrypted bucket that only accepts TLS. Executors and the
# broker get FABRIC_STORE=s3://BUCKET/PREFIX and IAM rights on that prefix only.

resource "aws_s3_bucket" "store" {
  #checkov:skip=CKV_AWS_18:access logging needs a second bucket of the user's choosing; CloudTrail data events cover audits
  #checkov:skip=CKV_AWS_144:cross-region replication doubles cost; fabric's objects are re-creatable intermediate data
  #checkov:skip=CKV2_AWS_62:no consumer for event notifications; fabric reads its objects directly
  bucket        = coalesce(var.bucket_name, "${var.name}-store-${data.aws_caller_identity.current.account_id}")
  force_destroy = var.force_destroy_bucket
  tags          = merge(local.common_tags, { Name = "${var.name}-store" })
}

resource "aws_s3_bucket_versioning" "store" {
  bucket = aws_s3_bucket.store.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "store" {
  bucket = aws_s3_bucket.store.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.this.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_public_access_block" "store" {
  bucket                  = aws_s3_bucket.store.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "store" {
  bucket = aws_s3_bucket.store.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "store" {
  bucket = aws_s3_bucket.store.id
  rule {
    id     = "tidy"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 2
    }
    noncurrent_version_expiration {
      noncurrent_days = 30
    }
  }
  depends_on = [aws_s3_bucket_versioning.store]
}

resource "aws_s3_bucket_policy" "store" {
  bucket = aws_s3_bucket.store.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "TLSOnly"
      Effect    = "Deny"
      Principal = "*"
      Action    = "s3:*"
      Resource  = [aws_s3_bucket.store.arn, "${aws_s3_bucket.store.arn}/*"]
      Condition = { Bool = { "aws:SecureTransport" = "false" } }
    }]
  })
  depends_on = [aws_s3_bucket_public_access_block.store]
}
