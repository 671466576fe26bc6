{{/* Common labels. */}}
{{- define "musubi.labels" -}}
app.kubernetes.io/part-of: musubi
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "musubi.tag" -}}
{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Pod and container security: non-root, read-only, no capabilities. */}}
{{- define "musubi.podSecurity" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}
{{- define "musubi.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end }}

{{/* The projected token the identity service checks (audience identity.musubi.io). */}}
{{- define "musubi.tokenVolume" -}}
- name: musubi-token
  projected:
    sources:
      - serviceAccountToken:
          audience: identity.musubi.io
          expirationSeconds: 3600
          path: token
{{- end }}
